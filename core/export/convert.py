"""Write quantized weights into an export layout, re-layout a quantized folder into another
format, and read any quantized folder back as Quantscope weights or dequantized tensors.

The engine writes its own outputs while it quantizes; these functions serve `quantscope export`
(an existing quantized folder → another layout, or any folder → dequantized tensors for GGUF) and
the tests. Everything goes through the engine's atomic `OutputWriter`, one shard per decoder
layer, so at most one layer's tensors are resident.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from core.config import (
    FourBitConfig,
    FP8Config,
    GPTQConfig,
    Granularity,
    LLMInt8Config,
    RTNConfig,
    SmoothQuantConfig,
)
from core.events import CancelToken, Progress, Sink, StageStarted, check_cancel, null_sink
from core.export.base import Exporter, detect_exporter, exporters_accepting, get_exporter, ragged_refusal
from core.model_io import ModelSource, open_model
from core.output import OutputWriter, output_config, package_versions
from core.qtensors import FourBitWeight, Fp8Weight, Int8RowWeight, IntWeight, QuantizedWeight


def method_config_for(q: QuantizedWeight) -> Any:
    """The method settings that describe an already-quantized weight: what an exporter needs to
    judge (`accepts`) and describe (`quantization_config`) a layout it did not produce."""
    if isinstance(q, IntWeight):
        if q.act is not None:
            return SmoothQuantConfig(act_scheme=q.act.scheme)
        if q.scale.numel() == 1:
            gran, gs = Granularity.TENSOR, 128
        elif q.scale.shape[1] == 1:
            gran, gs = Granularity.CHANNEL, 128
        else:
            gran, gs = Granularity.GROUP, q.group_size
        natural = torch.arange(q.shape[1]) // q.group_size
        if q.g_idx is not None and not torch.equal(q.g_idx.long(), natural):
            return GPTQConfig(bits=q.bits, group_size=gs, sym=q.sym, granularity=gran, act_order=True,
                              static_groups=False)
        return RTNConfig(bits=q.bits, group_size=gs, sym=q.sym, granularity=gran)
    if isinstance(q, Fp8Weight):
        gran = Granularity.TENSOR if q.scale.numel() == 1 else Granularity.CHANNEL
        return FP8Config(fmt=q.fmt, granularity=gran)
    if isinstance(q, FourBitWeight):
        return FourBitConfig(quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant)
    if isinstance(q, Int8RowWeight):
        return LLMInt8Config(threshold=q.threshold)
    raise ValueError(f"unknown quantized weight type {type(q).__name__}")


def refuse_unless_accepted(exporter: Exporter, method_config: Any) -> None:
    """Fail before any work when `exporter` cannot represent the method, naming the formats
    that can."""
    reason = exporter.accepts(method_config)
    if reason is None:
        return
    can = exporters_accepting(method_config)
    alternatives = f"formats that can: {', '.join(can)}" if can else "no export format can store it"
    raise ValueError(f"cannot export {method_config.method} to {exporter.name}: {reason} ({alternatives})")


def refuse_ragged(exporter: Exporter, weights: dict[str, QuantizedWeight]) -> None:
    """Fail when `exporter` cannot store the ragged last group (group size not dividing
    in_features) of one of `weights`, an already-quantized layer: the fix is another layout or
    quantizing again with a group size that divides every width."""
    ragged = {m: q for m, q in weights.items()
              if isinstance(q, IntWeight) and q.scale.shape[1] > 1 and q.shape[1] % q.group_size}
    if not ragged:
        return
    module, q = next(iter(ragged.items()))
    widths = {w.shape[1] for w in weights.values() if isinstance(w, IntWeight)}
    gptq_ok = get_exporter("gptq").accepts(method_config_for(q)) is None
    msg = ragged_refusal(exporter.name, module, q.shape[1], q.group_size, widths, flag="--format",
                         requantize=True, gptq_ok=gptq_ok)
    if msg is not None:
        raise ValueError(msg)


def _module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def _layer_groups(src: ModelSource) -> Iterator[tuple[str, list[str]]]:
    """(label, tensor names) per decoder layer, then everything outside the layers."""
    for i in range(src.num_layers):
        names = src.layer_tensor_names(i)
        if names:
            yield f"layer {i}", names
    rest = src.non_layer_tensor_names()
    if rest:
        yield "embeddings/head", rest


def read_quantized_group(
    src: ModelSource, names: list[str], exporter: Exporter | None
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Split a group of stored tensors into quantized linears (rebuilt by `exporter`) and the
    plain tensors left (norms, biases, embeddings)."""
    loaded = src.load_tensors(names)
    if exporter is None or src.quantization_config is None:
        return {}, loaded
    qc = src.quantization_config
    weights: dict[str, QuantizedWeight] = {}
    for module in dict.fromkeys(_module_of(n) for n in names):
        q = exporter.read_weight(module, loaded.get, qc)
        if q is not None:
            weights[module] = q
    plain = {n: t for n, t in loaded.items()
             if _module_of(n) not in weights or n.endswith(".bias")}
    return weights, plain


def iter_dequantized(
    model_dir: str | Path, *, cancel: CancelToken | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a model folder as a float tensor, quantized linears dequantized to
    `<module>.weight` [out, in]; one decoder layer resident at a time."""
    src = open_model(model_dir)
    src.require_weights()
    exporter = detect_exporter(src.quantization_config) if src.quantization_config else None
    for _, names in _layer_groups(src):
        check_cancel(cancel)
        weights, plain = read_quantized_group(src, names, exporter)
        for module, q in weights.items():
            yield f"{module}.weight", q.dequantize().float()
        yield from plain.items()


def dequantized_shapes(model_dir: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `iter_dequantized` yields, in the same order, without
    dequantizing: from the headers for a float folder, from the packed weights for a quantized
    one (one decoder layer resident at a time). Lets a writer lay out a file before its data."""
    src = open_model(model_dir)
    src.require_weights()
    exporter = detect_exporter(src.quantization_config) if src.quantization_config else None
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for _, names in _layer_groups(src):
        if exporter is None:
            shapes += [(n, tuple(int(d) for d in src.tensors[n].shape)) for n in names]
            continue
        weights, plain = read_quantized_group(src, names, exporter)
        shapes += [(f"{module}.weight", tuple(int(d) for d in q.shape)) for module, q in weights.items()]
        shapes += [(n, tuple(int(d) for d in t.shape)) for n, t in plain.items()]
    return shapes


class _Stored:
    """What `write_quantized` and `relayout` gather while storing quantized linears in
    `exporter`'s layout, and the files that close the folder once every layer is written."""

    def __init__(self, exporter: Exporter, method_config: Any | None, dtype: torch.dtype) -> None:
        self.exporter = exporter
        self.method_config = method_config
        self.dtype = dtype  # the torch_dtype config.json names: the source's, then the weights'
        self.quantized: list[str] = []

    def add(self, module: str, q: QuantizedWeight, tensors: dict[str, torch.Tensor]) -> None:
        """Put `q`'s tensors in the layout into `tensors` (the shard being built)."""
        if self.method_config is None:
            # Judged on the first quantized weight, before anything of it is written.
            self.method_config = method_config_for(q)
            refuse_unless_accepted(self.exporter, self.method_config)
        refuse_ragged(self.exporter, {module: q})
        if getattr(q, "dtype", None) is not None:
            self.dtype = q.dtype
        tensors.update(self.exporter.tensors(module, q))
        self.quantized.append(module)

    def finish(self, writer: OutputWriter, src: ModelSource, export_format: str, ignored: list[str]) -> Path:
        """config.json with the layout's quantization_config, its sidecar files and the report."""
        qc = self.exporter.quantization_config(self.method_config, self.quantized, ignored)
        config = output_config(src.config, qc, self.dtype)
        write_extra_files(writer, self.exporter, qc)
        report = {"export": export_format, "source": str(src.path), "quantized": len(self.quantized),
                  "versions": package_versions()}
        return writer.finish(config=config, report=report, source=src.path)


def write_quantized(
    source_dir: str | Path,
    out: str | Path,
    export_format: str,
    quantize: Callable[[str, torch.Tensor], QuantizedWeight | None],
    *,
    method_config: Any | None = None,
    overwrite: bool = False,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> Path:
    """Write the float folder `source_dir` in layout `export_format`: each 2-D weight for which
    `quantize(module_name, weight)` returns a quantized weight is stored in that layout, the rest
    is copied. `method_config` (checked with `accepts` before any work) defaults to one derived
    from the first quantized weight."""
    src = open_model(source_dir)
    src.require_weights()
    exporter = get_exporter(export_format)
    if method_config is not None:
        refuse_unless_accepted(exporter, method_config)
    groups = list(_layer_groups(src))
    stored = _Stored(exporter, method_config, src.source_dtype)
    ignored: list[str] = []
    output = OutputWriter(out, num_shards=len(groups), overwrite=overwrite, source=src.path)
    output.check_target()
    sink(StageStarted("export", total=len(groups), message=f"writing {export_format}"))
    with output as writer:
        for index, (label, names) in enumerate(groups):
            check_cancel(cancel)
            tensors: dict[str, torch.Tensor] = {}
            for name, t in src.load_tensors(names).items():
                module = _module_of(name)
                q = quantize(module, t) if name.endswith(".weight") and t.dim() == 2 else None
                if q is None:
                    if name.endswith(".weight") and t.dim() == 2 and not name.endswith("embed_tokens.weight"):
                        ignored.append(module)
                    tensors[name] = t
                    continue
                stored.add(module, q, tensors)
            writer.write_shard(index, tensors)
            sink(Progress("export", index + 1, len(groups), label))
        if stored.method_config is None:
            raise ValueError(f"no linear weight of {source_dir} was quantized; nothing to export as {export_format}")
        if "lm_head" not in stored.quantized:
            ignored.append("lm_head")  # a tied head has no tensor of its own but is still a Linear
        return stored.finish(writer, src, export_format, sorted(set(ignored)))


def relayout(
    model_dir: str | Path,
    out: str | Path,
    export_format: str,
    *,
    overwrite: bool = False,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> Path:
    """Rewrite a quantized folder (any layout Quantscope reads) in layout `export_format`, with
    the same codes, scales and zero points: no re-quantization, so the function is unchanged."""
    src = open_model(model_dir)
    src.require_weights()
    if src.quantization_config is None:
        raise ValueError(f"{src.path} is not quantized; quantize it first (quantscope quantize --model "
                         f"{src.path} --method rtn --export {export_format} --out DIR) or export it as gguf")
    reader = detect_exporter(src.quantization_config)
    exporter = get_exporter(export_format)
    groups = list(_layer_groups(src))
    # The source guard, the --overwrite rules and the lock of every output (core.output).
    output = OutputWriter(out, num_shards=len(groups), overwrite=overwrite, source=src.path)
    output.check_target()
    # Judge the target layout on the first quantized layer, before anything is written.
    method_config = None
    for _, names in groups:
        weights, _ = read_quantized_group(src, names, reader)
        if weights:
            method_config = method_config_for(next(iter(weights.values())))
            refuse_unless_accepted(exporter, method_config)
            refuse_ragged(exporter, weights)
            break
    stored = _Stored(exporter, method_config, src.source_dtype)
    ignored = [n for n in (src.quantization_config.get("ignore") or []) if not n.startswith("re:")]
    sink(StageStarted("export", total=len(groups), message=f"re-writing as {export_format}"))
    with output as writer:
        for index, (label, names) in enumerate(groups):
            check_cancel(cancel)
            weights, tensors = read_quantized_group(src, names, reader)
            for module, q in weights.items():
                stored.add(module, q, tensors)
            writer.write_shard(index, tensors)
            sink(Progress("export", index + 1, len(groups), label))
        if stored.method_config is None:
            raise ValueError(f"{src.path} has a quantization_config but no quantized weights were found")
        if "lm_head" not in stored.quantized:
            ignored = sorted(set(ignored) | {"lm_head"})  # a tied head has no tensor but is still a Linear
        return stored.finish(writer, src, export_format, ignored)


def write_extra_files(writer: OutputWriter, exporter: Exporter, quantization_config: dict) -> None:
    """Files some layouts add beside config.json (GPTQ's quantize_config.json, AutoAWQ's
    quant_config.json), from the exporter's optional `extra_files`."""
    extra = getattr(exporter, "extra_files", None)
    if extra is None:
        return
    for name, text in extra(quantization_config).items():
        (writer.tmp / name).write_text(text)


def rtn_quantizer(method_config: RTNConfig, skip: tuple[str, ...] = ("lm_head", "embed_tokens")
                  ) -> Callable[[str, torch.Tensor], QuantizedWeight | None]:
    """A `quantize` callback for `write_quantized`: round-to-nearest on every decoder linear."""
    from core.primitives import quantize_to_intweight

    def quantize(module: str, weight: torch.Tensor) -> QuantizedWeight | None:
        if ".layers." not in module or any(s in module for s in skip):
            return None
        return quantize_to_intweight(weight.float(), method_config.bits, method_config.sym,
                                     method_config.granularity, method_config.group_size,
                                     method_config.clip_search, dtype=weight.dtype, name=module)

    return quantize


def read_weights(model_dir: str | Path) -> dict[str, QuantizedWeight]:
    """All quantized linears of a folder as Quantscope weights (small models and tests)."""
    src = open_model(model_dir)
    src.require_weights()
    if src.quantization_config is None:
        return {}
    exporter = detect_exporter(src.quantization_config)
    out: dict[str, QuantizedWeight] = {}
    for _, names in _layer_groups(src):
        weights, _ = read_quantized_group(src, names, exporter)
        out.update(weights)
    return out

"""Frozen settings for each quantization method, the calibration source and the whole job.

Every config validates itself in `__post_init__` and raises `ValueError` that says what to fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Granularity(str, Enum):
    """How many elements share one scale: the whole tensor, one output row, or a group of
    `group_size` consecutive input columns within a row."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


def _check_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {', '.join(map(str, allowed))}, got {bits}")


def _check_group(granularity: Granularity, group_size: int) -> None:
    if granularity is Granularity.GROUP and (group_size <= 0 or group_size % 8):
        raise ValueError(f"group_size must be a positive multiple of 8 (e.g. 32, 64, 128), got {group_size}")


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest affine integer quantization."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    granularity: Granularity = Granularity.GROUP
    clip_search: bool = False  # search a per-group clip ratio minimising reconstruction error

    method = "rtn"

    def __post_init__(self) -> None:
        _check_bits(self.bits, (2, 3, 4, 5, 6, 7, 8))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        _check_group(self.granularity, self.group_size)


@dataclass(frozen=True)
class FourBitConfig:
    """bitsandbytes-compatible NF4 / FP4 blockwise quantization."""

    quant_type: str = "nf4"  # "nf4" | "fp4"
    blocksize: int = 64
    double_quant: bool = False

    @property
    def method(self) -> str:
        return self.quant_type

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two between 32 and 4096, got {self.blocksize}")


@dataclass(frozen=True)
class FP8Config:
    fmt: str = "e4m3"  # "e4m3" | "e5m2"
    granularity: Granularity = Granularity.CHANNEL

    method = "fp8"

    def __post_init__(self) -> None:
        if self.fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {self.fmt!r}")
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.granularity is Granularity.GROUP:
            raise ValueError("FP8 supports granularity 'tensor' or 'channel', not 'group'")


# Bytes of down_proj inputs GPTQ's staged layer may keep for the layer's final output (else it
# re-runs gate/up): at most this, and at most a quarter of the available memory. The planner's
# GPTQ memory estimate uses the same limit.
GPTQ_KEEP_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    granularity: Granularity = Granularity.GROUP
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True

    method = "gptq"

    def __post_init__(self) -> None:
        _check_bits(self.bits, (2, 3, 4, 5, 6, 7, 8))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        _check_group(self.granularity, self.group_size)
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1), e.g. 0.01, got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    granularity: Granularity = Granularity.GROUP
    grid: int = 20
    clip: bool = True

    method = "awq"

    def __post_init__(self) -> None:
        _check_bits(self.bits, (2, 3, 4, 5, 6, 7, 8))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        _check_group(self.granularity, self.group_size)
        if self.grid < 2:
            raise ValueError(f"grid must be at least 2, got {self.grid}")


@dataclass(frozen=True)
class SmoothQuantConfig:
    # Migration strength: a number in [0, 1] for every layer, or "auto" to search it per smoothing
    # group (the α whose W8A8 output error is smallest on a calibration subsample).
    alpha: float | str = 0.5
    act_scheme: str = "dynamic"  # "dynamic" (per-token, at inference) | "static" (per-tensor, calibrated)

    method = "smoothquant"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"alpha must be a number between 0 and 1 or 'auto' (searched per layer), "
                                 f"got {self.alpha!r}")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number between 0 and 1 (0.5 is the usual value) or 'auto', "
                             f"got {self.alpha!r}")
        if self.act_scheme not in ("dynamic", "static"):
            raise ValueError(f"act_scheme must be 'dynamic' or 'static', got {self.act_scheme!r}")


@dataclass(frozen=True)
class LLMInt8Config:
    threshold: float = 6.0

    method = "llm_int8"

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise ValueError(f"threshold must be positive (6.0 is the usual value), got {self.threshold}")


MethodConfig = RTNConfig | FourBitConfig | FP8Config | GPTQConfig | AWQConfig | SmoothQuantConfig | LLMInt8Config

CALIBRATED_METHODS = frozenset({"gptq", "awq", "smoothquant", "llm_int8"})


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text: "builtin" (Python's pydoc_data.topics), a .txt file or a .jsonl file
    with a `text` field."""

    source: str = "builtin"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 tokens, got {self.seq_len}")
        if self.source != "builtin" and not Path(self.source).is_file():
            raise ValueError(f"calibration file not found: {self.source} (use 'builtin' or a .txt/.jsonl file)")


# Modules kept in the source precision unless the user says otherwise.
DEFAULT_SKIP = ("embed_tokens", "lm_head", "norm")


@dataclass(frozen=True)
class QuantJob:
    model: Path
    out: Path
    method: MethodConfig
    calib: CalibConfig | None = None
    export: str | None = None  # export format name; None = the method's default layout
    skip: tuple[str, ...] = DEFAULT_SKIP  # substrings of module names left unquantized
    overwrite: bool = False
    resume: bool = False
    # Where the layers are quantized: "cpu", "cuda", "cuda:N" or "auto" (the GPU when the
    # planner's memory estimate fits its free memory); core.devices.resolve_device decides.
    device: str = "cpu"
    trust_remote_code: bool = False
    # CPU threads (torch intra-op and the streaming kernels' row workers); None = the cores in
    # this process's affinity mask (core.devices.thread_scope).
    threads: int | None = None

    def __post_init__(self) -> None:
        from core.devices import check_device_spec, check_threads

        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "device", check_device_spec(self.device))
        check_threads(self.threads)
        if self.method.method in CALIBRATED_METHODS and self.calib is None:
            object.__setattr__(self, "calib", CalibConfig())

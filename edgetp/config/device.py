"""Device profiles: what one device does per second, as ``edgetp probe`` writes it or a user does.

A profile is a JSON file (``edgetp probe --out NAME.json``) or the same figures inline under a
node's ``profile:`` in a cluster file. :class:`ProfileFile` is its schema (a pydantic model:
the keys, their types and ranges, the defaults of a hand-written profile); :class:`DeviceProfile`
is what the planner computes with, every figure resolved:

- ``mem_bw_gbs`` (required): GB/s of a streaming read (KV cache reads).
- ``matvec_gbs``: weight GB/s of a ``[1, d] x [d, k]`` product per dtype: one number for
  float32 and bfloat16, or a mapping with both and optionally int8 and int4 (else
  :data:`QUANT_MATVEC_FRACTION` of the float32 figure). Left out: ``mem_bw_gbs``.
- ``flops_gflops``: GFLOP/s a ``[128, d]`` product adds over a 1-token one, per dtype.
- ``disk_bw_mbs``: MB/s the window reads a split's tensors at.
- ``layer_overhead_us`` / ``step_overhead_us`` / ``msg_overhead_us``: software time of one
  decoder layer, one step, one ZeroMQ message; ``data_msg_overhead_us`` one data-link message
  (left out: :data:`DATA_LINK_FRACTION` of ``msg_overhead_us``).
- ``runtime_rss``, ``free_memory``: sizes (``300MB``, ``8GiB`` or bytes).

The probe also records facts about its run (host, threads, link figures...): they are allowed
and not used. A wrong profile is a :class:`~edgetp.core.errors.ConfigError` naming where it
came from (the profile file, or the cluster file and node), the key and the fix.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from edgetp.core.errors import ConfigError
from edgetp.core.units import parse_bytes

PROFILE_VERSION = 1
COMPUTE_DTYPES = ("float32", "bfloat16")
QUANT_FORMATS = ("int8", "int4")
MATVEC_DTYPES = (*COMPUTE_DTYPES, *QUANT_FORMATS)  # weights a product reads
# A hand-written profile without int8/int4 figures gets these fractions of its float32 one
# (torch 2.13's CPU kernels on the development machine; `edgetp probe` measures them).
QUANT_MATVEC_FRACTION = {"int8": 0.55, "int4": 0.6}
DATA_LINK_FRACTION = 0.55  # a data-link message's cost over a ZeroMQ one, when not measured
SIZE_FIGURES = ("runtime_rss", "free_memory")
REQUIRED_FIGURES = {"mem_bw_gbs": "memory bandwidth, GB/s"}  # what a profile cannot leave out


def _size(value: Any) -> Any:
    """A size as written (``"300MB"``, ``"8GiB"``) in bytes; numbers are left to the int check."""
    return parse_bytes(value) if isinstance(value, str) else value


def _both_dtypes(value: Any) -> Any:
    """One number stands for float32 and bfloat16 alike."""
    return value if isinstance(value, dict) else dict.fromkeys(COMPUTE_DTYPES, value)


Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Overhead = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Size = Annotated[int, BeforeValidator(_size), Field(ge=0)]


class ComputeRates(BaseModel):
    """A figure per compute dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    float32: Rate
    bfloat16: Rate


class MatvecRates(ComputeRates):
    """Matrix-vector figures: the compute dtypes, and the quantized formats when measured."""

    int8: Rate | None = None
    int4: Rate | None = None


class ProfileFile(BaseModel):
    """The keys of a profile, as a file or a cluster file's inline ``profile:`` holds them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mem_bw_gbs: Rate
    matvec_gbs: Annotated[MatvecRates, BeforeValidator(_both_dtypes)] | None = None
    flops_gflops: Annotated[ComputeRates, BeforeValidator(_both_dtypes)] = Field(
        50.0, validate_default=True)
    disk_bw_mbs: Rate = 500.0
    layer_overhead_us: Overhead = 150.0
    step_overhead_us: Overhead = 300.0
    msg_overhead_us: Overhead = 60.0
    data_msg_overhead_us: Overhead | None = None
    runtime_rss: Size = 300 * 2**20
    free_memory: Size | None = None
    # what `edgetp probe` records about its run; the planner does not use these
    version: Any = None
    host: Any = None
    cpu_count: Any = None
    threads: Any = None
    torch_version: Any = None
    disk_path: Any = None
    disk_seq_mbs: Any = None
    disk_note: Any = None
    total_memory: Any = None
    link: Any = None
    quick: Any = None
    probe_seconds: Any = None
    matvec_shapes: Any = None
    kernel_paths: Any = None  # product -> path of the native kernels (edgetp.kernels.native)
    kernel_target: Any = None  # EDGETP_KERNEL_TARGET the kernels were built for
    stream_reader: Any = None  # what read for the stream figures (edgetp.perf.streams)
    stream_read_gbs: Any = None  # streams at once -> their total read GB/s

    def device_profile(self) -> DeviceProfile:
        """The figures resolved: defaults filled in, one number spread over the dtypes."""
        matvec = self.matvec_gbs or MatvecRates(float32=self.mem_bw_gbs,
                                                bfloat16=self.mem_bw_gbs)
        figures = {d: getattr(matvec, d) for d in COMPUTE_DTYPES}
        for fmt in QUANT_FORMATS:
            measured = getattr(matvec, fmt)
            figures[fmt] = (measured if measured is not None
                            else figures["float32"] * QUANT_MATVEC_FRACTION[fmt])
        data_msg = self.data_msg_overhead_us
        return DeviceProfile(
            mem_bw_gbs=self.mem_bw_gbs, matvec_gbs=figures,
            flops_gflops={d: getattr(self.flops_gflops, d) for d in COMPUTE_DTYPES},
            disk_bw_mbs=self.disk_bw_mbs, layer_overhead_us=self.layer_overhead_us,
            step_overhead_us=self.step_overhead_us, msg_overhead_us=self.msg_overhead_us,
            runtime_rss=self.runtime_rss, free_memory=self.free_memory,
            data_msg_overhead_us=(DATA_LINK_FRACTION * self.msg_overhead_us
                                  if data_msg is None else data_msg),
            kernel_paths=({str(k): str(v) for k, v in self.kernel_paths.items()}
                          if isinstance(self.kernel_paths, dict) else None))


def profile_figure(value: float) -> float:
    """A measured figure as a profile keeps it: four significant digits."""
    return float(f"{value:.4g}")


INFO_KEYS = ("version", "host", "cpu_count", "threads", "torch_version", "disk_path",
             "disk_seq_mbs", "disk_note", "total_memory", "link", "quick", "probe_seconds",
             "matvec_shapes", "kernel_paths", "kernel_target", "stream_reader",
             "stream_read_gbs")
PERF_KEYS = tuple(key for key in ProfileFile.model_fields if key not in INFO_KEYS)


@dataclass(frozen=True)
class DeviceProfile:
    """What one device does per second, every figure resolved (see the module docstring)."""

    mem_bw_gbs: float
    matvec_gbs: dict[str, float]  # every dtype of MATVEC_DTYPES
    flops_gflops: dict[str, float]  # every dtype of COMPUTE_DTYPES
    disk_bw_mbs: float
    layer_overhead_us: float
    step_overhead_us: float
    msg_overhead_us: float
    runtime_rss: int
    free_memory: int | None = None
    data_msg_overhead_us: float = 0.0
    kernel_paths: dict[str, str] | None = None  # product -> decode kernel path (the probe's)

    def matvec_bytes_per_s(self, dtype: str) -> float:
        return self.matvec_gbs[dtype] * 1e9

    def flops_per_s(self, dtype: str) -> float:
        return self.flops_gflops[dtype] * 1e9

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> DeviceProfile:
        """Validate a profile mapping (from ``edgetp probe`` or written by hand); ``source``
        names it in errors (a file, or a cluster file and node)."""
        try:
            return ProfileFile.model_validate(data).device_profile()
        except ValidationError as exc:
            raise ConfigError(f"{source}: {profile_problem(exc.errors(), data)}") from None


def load_profile(path: str | Path, where: str | None = None) -> DeviceProfile:
    """Read a profile JSON file written by ``edgetp probe`` (or by hand); ``where`` (e.g. the
    cluster file and node that name it) leads every error."""
    path = Path(path)
    lead = "" if where is None else f"{where}: "
    if not path.is_file():
        raise ConfigError(f"{lead}profile {path} not found; create it with "
                          f"`edgetp probe --out {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{lead}profile {path} is not valid JSON: {exc}") from exc
    return DeviceProfile.from_dict(data, f"{lead}{path}")


# -- errors in the project's words ---------------------------------------------------------------

def profile_problem(errors: list[ErrorDetails], data: Any) -> str:
    """One sentence for the first thing wrong with a profile, saying how to fix it."""
    unknown = [str(e["loc"][0]) for e in errors
               if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if unknown:
        return _unknown_keys(unknown)
    error = errors[0]
    if not error["loc"]:
        return "a profile must be a mapping of figures"
    key = str(error["loc"][0])
    if error["type"] == "missing" and len(error["loc"]) == 1:
        return f"the profile needs {key} ({REQUIRED_FIGURES[key]})"
    if len(error["loc"]) > 1 and error["type"] in ("missing", "extra_forbidden"):
        if key == "matvec_gbs":
            return (f"{key} needs the keys {', '.join(COMPUTE_DTYPES)} and may have "
                    f"{', '.join(QUANT_FORMATS)} (or one number for both float dtypes)")
        return f"{key} needs exactly the keys {', '.join(COMPUTE_DTYPES)} (or one number for both)"
    if key in SIZE_FIGURES:
        return f"{key} must be a size such as 300MB or 8GiB, got {data[key]!r}"
    given = data[key]
    name = ".".join(str(part) for part in error["loc"]) if isinstance(given, dict) else key
    value = given[error["loc"][1]] if isinstance(given, dict) else given
    kind = "a number >= 0" if key.endswith("_us") else "a positive number"
    return f"{name} must be {kind}, got {value!r}"


def _unknown_keys(unknown: list[str]) -> str:
    hints = [(key, matches[0]) for key in unknown
             if (matches := difflib.get_close_matches(key, PERF_KEYS, n=1))]
    hint = ""
    if hints:
        key, close = hints[0]
        hint = (f" (did you mean {close!r}?)" if len(unknown) == 1
                else f" (did you mean {close!r} for {key!r}?)")
    return f"unknown profile key(s) {sorted(unknown)}{hint}; known: {', '.join(PERF_KEYS)}"

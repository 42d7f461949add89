"""How a split stores its tensors and a run computes with them: the dtypes a plan is made for."""

from __future__ import annotations

from dataclasses import dataclass

from edgetp.core.errors import ConfigError
from edgetp.shard.quant import QUANT_DTYPES, head_format

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT_DTYPES = tuple(ELEMENT_BYTES)
WEIGHT_DTYPES = (*FLOAT_DTYPES, *QUANT_DTYPES)  # as `edgetp split --dtype`


@dataclass(frozen=True)
class Storage:
    """How a split stores its tensors and a run computes with them.

    ``weights`` is ``edgetp split --dtype``: a float dtype, or int8/int4 for the linear
    weights; ``floats`` the dtype of everything else (norms, embedding, biases: a quantized
    split keeps the checkpoint's); ``compute`` the run's ``--dtype`` (activations, KV cache);
    ``group_size`` int4's requested group; ``head`` ``--head-dtype`` (None: its default).
    """

    weights: str = "float32"
    floats: str = "float32"
    compute: str = "float32"
    group_size: int = 32
    head: str | None = None

    @classmethod
    def of(cls, dtype: str, float_dtype: str | None = None, compute_dtype: str | None = None,
           group_size: int = 32, head: str | None = None) -> Storage:
        if dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: plan one of {', '.join(WEIGHT_DTYPES)}")
        quantized = dtype in QUANT_DTYPES
        floats = (float_dtype or "bfloat16") if quantized else dtype  # a float split: all dtype
        compute = compute_dtype or ("float32" if quantized else dtype)
        for what, value in (("float dtype", floats), ("compute dtype", compute)):
            if value not in FLOAT_DTYPES:
                raise ConfigError(f"{what} {value!r}: one of {', '.join(FLOAT_DTYPES)}")
        return cls(dtype, floats, compute, group_size, head)

    @classmethod
    def coerce(cls, dtype: str | Storage) -> Storage:
        """``dtype`` as given, or the storage of a split in ``dtype`` with the defaults."""
        return dtype if isinstance(dtype, Storage) else cls.of(dtype)

    @property
    def quantized(self) -> bool:
        return self.weights in QUANT_DTYPES

    @property
    def head_format(self) -> str:
        """How the split stores the lm_head: int8, int4 or a float dtype."""
        return head_format(self.weights, self.head, self.floats)

    @property
    def head_quantized(self) -> bool:
        return self.head_format in QUANT_DTYPES

    @property
    def compute_bytes(self) -> int:
        return ELEMENT_BYTES[self.compute]

    @property
    def kernel_dtype(self) -> str:
        """The dtype whose figures time the matrix products (quantized: bfloat16 kernels)."""
        return "bfloat16" if self.quantized else self.compute

"""GGUF files in: llama.cpp's format converted into a Hugging Face model directory.

:func:`convert_gguf` writes the directory (config, tokenizer, safetensors); the modules say how
each part is made. The content-keyed cache that lets every command take a ``.gguf`` in place of
``MODEL_DIR`` is ``edgetp.shard.gguf_cache``; the splitter's reuse of the file's own 4- and
8-bit blocks is ``edgetp.shard.gguf_blocks``.
"""

from edgetp.model.gguf.convert import (
    GGUF_SOURCE_FILE,
    ConvertPlan,
    convert_gguf,
    read_source_record,
)
from edgetp.model.gguf.reader import GGUFError, GGUFFile, is_gguf_path

__all__ = ["GGUF_SOURCE_FILE", "ConvertPlan", "GGUFError", "GGUFFile", "convert_gguf",
           "is_gguf_path", "read_source_record"]

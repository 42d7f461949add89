"""The single-device Llama family, and what the master needs around it.

Owns the decoder in plain torch (:mod:`.llama`: Llama 2/3/3.1/3.2, Mistral, Qwen2), reading
Hugging Face checkpoints tensor by tensor (:mod:`.checkpoint`), the default context that fits
a node (:mod:`.context`), the tokenizer (:mod:`.tokenizer`) with a token floor found without
encoding (:mod:`.token_floor`) and chat templates rendered in a bounded sandbox process
(:mod:`.template_renderer`, :mod:`.template_sandbox`), sampling (:mod:`.sampling`), the bundled
demo model (:mod:`.demo`) and synthetic checkpoints for tests and benchmarks
(:mod:`.synthetic`).

May import: edgetp.kernels, edgetp.config, edgetp.core (and torch, safetensors, tokenizers,
jinja2). It knows nothing of ranks, shards or networks: the layers above rewrite it for tensor
parallelism.
"""

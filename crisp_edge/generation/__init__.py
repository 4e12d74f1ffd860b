"""Text generation for CRISP language models: the one decoding loop every runtime shares.

A runtime (PyTorch, ONNX Runtime, ExecuTorch) provides an :class:`~crisp_edge.generation.loop.LMStepper`:
``step(token_ids, start_pos) -> logits of the last position``, over its own key/value cache. Everything
else is here, once: sampling (greedy, temperature, top-p, seeded), the loop with its stop conditions and
streaming callback, the tokenizer a bundle carries (``tokenizer.json``, read by the ``tokenizers``
library: JSON, no code), and the PyTorch reference stepper that parity compares against.

    from crisp_edge.generation import Sampling, TorchStepper, generate
    out = generate(TorchStepper(model, max_seq_len=256), prompt_ids, 64, sampling=Sampling())
"""
from crisp_edge.generation.loop import CachedStepper, Generation, LMStepper, forced_logits, generate
from crisp_edge.generation.reference import TorchStepper
from crisp_edge.generation.sampling import Sampling, choose_token
from crisp_edge.generation.tokenizer import BundleTokenizer, write_tokenizer

__all__ = ["BundleTokenizer", "CachedStepper", "Generation", "LMStepper", "Sampling", "TorchStepper",
           "choose_token", "forced_logits", "generate", "write_tokenizer"]

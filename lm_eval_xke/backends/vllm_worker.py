"""Methods mixed into every vLLM worker (``worker_extension_cls``) so that the `vllm` backend can rewrite weights.

The worker runs in vLLM's own process: this module is imported there by name and must stay light.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# vLLM logs, per reload, every layer that received no weights and every weight not in the file: the `vllm` backend
# reloads one or two matrices at a time, so those lines would flood the log
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"


class XkeWorkerExtension:
    """Called by name through ``LLM.collective_rpc``; ``self`` is vLLM's worker."""

    def xke_reload_weights(self, path: str) -> list[str]:
        """Load the checkpoint-format tensors of the safetensors file ``path`` into the running model.

        vLLM repacks weights after loading (fused q/k/v and gate/up, CPU kernels' layouts), so they are reloaded
        in checkpoint format through vLLM's own loader rather than copied into the parameters.
        """
        from safetensors.torch import load_file

        weights = load_file(path)
        with _quiet(_RELOAD_LOGGER):
            self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return sorted(weights)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)

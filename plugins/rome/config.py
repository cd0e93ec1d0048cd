"""ROME hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import AtDepth, EditorError, HyperParams

#: Where ROME writes, per ``model.config.model_type``, placed at the same relative depth of the loaded model. Layer 5
#: of 32 is EasyEdit's LLaMA-7B choice (the dataclass default; 5 of SmolLM2-135M's 30). Layer 5 was kept as the
#: early-middle layer of Qwen2.5-0.5B (24 layers) and Gemma-3-270M (18), where the README's numbers were measured, so
#: those families scale from there. GPT-2's MLP output is ``c_proj``, a ``Conv1D`` whose weight is stored
#: ``[in, out]``; the original ROME edits layer 17 of the 48-layer GPT-2 XL, 5 of 12 is GPT-2's early-middle layer.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"module_template": "model.layers.{}.mlp.down_proj"},
    "qwen2": {"layer": AtDepth(5, of=24), "module_template": "model.layers.{}.mlp.down_proj"},
    "gemma3_text": {"layer": AtDepth(5, of=18), "module_template": "model.layers.{}.mlp.down_proj"},
    "gpt2": {"layer": AtDepth(5, of=12), "module_template": "transformer.h.{}.mlp.c_proj"},
}

FACT_TOKENS = ("subject_last", "last")
#: what ``early_stop_loss`` is compared with
EARLY_STOP_ON = ("nll", "loss")
#: what ``context_template_lengths`` count
TEMPLATE_LENGTHS = ("new", "total")

#: EasyEdit's value optimisation (``rome/compute_v.py`` @ 14cea82) where ours differs by choice: its loop of
#: ``v_num_grad_steps: 25`` passes updates on the first 24 only (ours: 24 updates, then a pass that measures); it stops
#: once NLL + KL + weight decay < 0.05 (ours: the NLL alone, and only once the plain prompt is right); its context
#: prefixes are 5 or 10 tokens in all, NFKD-normalised with blank lines made spaces (``generate_fast``), sampled after
#: ``seed 42``. Sampling draws differ from EasyEdit's global-RNG draws, so the prefixes are alike, not identical.
EASYEDIT_VALUE_PRESET: dict[str, object] = {
    "v_num_grad_steps": 24,
    "early_stop_on": "loss",
    "early_stop_plain": False,
    "context_template_length": "total",
    "context_template_normalise": True,
    "template_seed": 42,
}


@dataclass
class ValueHyperParams(HyperParams):
    """What ROME and the editors built on it (MEMIT, AlphaEdit) share: the value optimisation (``compute_v``),
    its context templates, and the corpus of the key statistics. Defaults follow EasyEdit's ``llama-7b.yaml``."""

    fact_token: str = field(
        default="subject_last",
        metadata={"help": "token whose key is edited: 'subject_last' (the paper) or 'last' (last prompt token)"},
    )
    v_num_grad_steps: int = field(default=25, metadata={"help": "Adam steps when optimising the value vector v*"})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate for the value vector"})
    v_weight_decay: float = field(
        default=1e-3, metadata={"help": "weight of ||delta|| / ||v_init||^2 in the value loss (as the original code)"}
    )
    clamp_norm_factor: float = field(
        default=4.0, metadata={"help": "||delta|| is clamped to this multiple of ||v_init|| after every step"}
    )
    kl_factor: float = field(
        default=0.0625, metadata={"help": "weight of the KL term that keeps '{subject} is a' predictions unchanged"}
    )
    early_stop_loss: float = field(
        default=0.05, metadata={"help": "stop optimising once the quantity named by early_stop_on falls below this"}
    )
    early_stop_on: str = field(
        default="nll",
        metadata={"help": "'nll': the mean target NLL; 'loss': NLL + KL + weight decay (EasyEdit, the original code)"},
    )
    early_stop_plain: bool = field(
        default=True,
        metadata={"help": "stop early only once the plain prompt also predicts every target token (argmax)"},
    )
    # memory grows with it: ROME's 22 rows per request at float32 on SmolLM2-135M took 2.7 GB peak for 4 requests
    # and were killed for memory at 16 (9.9 GB) on a 23 GB machine; MEMIT has 7 rows per request
    v_batch_size: int = field(
        default=8,
        metadata={
            "help": "requests whose value optimisations share one batched forward/backward (MEMIT's batches, "
            "edit_parallel); bounds the memory, results do not depend on it"
        },
    )
    v_prefix_cache: bool = field(
        default=True,
        metadata={"help": "run each step on the tokens from the fact token on, the prefix from a KV cache"},
    )
    reuse_context_templates: bool = field(
        default=True,
        metadata={"help": "sample the context prefixes once per model; false: again for every edit call (slow)"},
    )
    context_template_lengths: list[int] = field(
        default_factory=lambda: [5, 10],
        metadata={"help": "token lengths of the generated context prefixes (model_args: '5|10')"},
    )
    context_templates_per_length: int = field(
        default=10, metadata={"help": "number of generated context prefixes per length"}
    )
    context_template_length: str = field(
        default="new",
        metadata={
            "help": "what context_template_lengths count: 'new' (sampled tokens after the start word) or 'total' "
            "(every token of the prefix, start word and BOS included, as EasyEdit's generate_fast)"
        },
    )
    context_template_normalise: bool = field(
        default=False,
        metadata={"help": "NFKD-normalise the prefixes and make blank lines spaces (EasyEdit's generate_fast)"},
    )
    mom2_corpus: str = field(
        default="en",
        metadata={
            "help": "corpus spec for C: sources joined by '+' with optional ':weight' (en, zh, en:0.7+zh:0.3, "
            "bizsre_en, a .txt/.json/.jsonl file, hf:<dataset>); see lm_eval_xke.stats"
        },
    )
    mom2_n_tokens: int = field(default=100_000, metadata={"help": "number of corpus tokens that C is estimated on"})
    mom2_batch_size: int = field(default=8, metadata={"help": "documents per forward pass when estimating C"})
    mom2_dtype: str = field(default="float32", metadata={"help": "accumulation dtype of C: float32 or float64"})
    # not `seed`: that model_arg is taken by the xke model itself and would never reach the editor
    template_seed: int = field(default=0, metadata={"help": "seed of the context-template sampling"})

    def check(self) -> None:
        """Reject values outside the choices (an EditorError naming the field and what is valid)."""
        for name, choices in (
            ("fact_token", FACT_TOKENS),
            ("early_stop_on", EARLY_STOP_ON),
            ("context_template_length", TEMPLATE_LENGTHS),
        ):
            if getattr(self, name) not in choices:
                raise EditorError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def template_groups(self) -> list[int]:
        """Sizes of the context-template groups, in ``generate_context_templates``' order: the bare prompt, then
        ``context_templates_per_length`` prefixes per length."""
        return [1, *[self.context_templates_per_length] * len(self.context_template_lengths)]


@dataclass
class RomeHyperParams(ValueHyperParams):
    """Hyper-parameters of ROME (Meng et al. 2022); defaults follow EasyEdit's ``ROME/llama-7b.yaml``."""

    layer: int = field(
        default=5,
        metadata={
            "help": "index of the transformer block whose MLP output is edited (default: 5 of 32, at the same "
            "relative depth of the loaded model)",
            "reference_depth": 32,
        },
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of the edited linear module; '{}' is replaced by `layer`"},
    )
    mom2_adjustment: bool = field(
        default=False,
        metadata={"help": "use u = C^-1 k with C the key second moment (off in EasyEdit's LLaMA configs)"},
    )

    @property
    def module_name(self) -> str:
        return self.module_template.format(self.layer)

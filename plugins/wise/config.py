"""WISE hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import AtDepth, HyperParams

#: Which FFN output projection gets a side memory, per ``model.config.model_type``. EasyEdit's LLaMA-2-7B setting
#: is ``model.layers[27].mlp.down_proj`` of 32 layers (the dataclass default, placed at the same relative depth, 0.84,
#: of the loaded model): layer 25 of SmolLM2-135M (30 layers), 15 of Gemma-3-270M (18) and 10 of GPT-2 (12, whose FFN
#: output projection is ``c_proj``). Its Qwen2.5-7B setting is 23 of 28: 20 of Qwen2.5-0.5B (24).
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "qwen2": {"layer": AtDepth(23, of=28)},
    "gpt2": {"module_template": "transformer.h.{}.mlp.c_proj"},
}

#: Unrelated prompts whose activations must stay below ``alpha`` (the paper samples unrelated inputs; EasyEdit feeds
#: one locality prompt per edit). Generic sentences in the languages of the benchmarks, none from their data.
IRRELEVANT_PROMPTS = (
    "The weather was mild and the children played in the park until dinner.",
    "How many legs does a spider have?",
    "She poured the coffee and opened the morning newspaper.",
    "今天下午我们在图书馆里读书。",
    "Der Zug nach Hamburg fährt um acht Uhr ab.",
    "Le marché du samedi vend des fruits et des légumes frais.",
    "私は毎朝公園を散歩します。",
)


@dataclass
class WiseHyperParams(HyperParams):
    """Hyper-parameters of WISE (Wang et al. 2024); defaults follow EasyEdit's ``WISE/llama-7b.yaml`` (WISE-Merge)."""

    layer: int = field(
        default=27,
        metadata={
            "help": "index of the transformer block whose FFN gets a side memory (default: 27 of 32, at the same "
            "relative depth of the loaded model)",
            "reference_depth": 32,
        },
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of the FFN output projection copied as side memory; '{}' is replaced by `layer`"},
    )
    mask_ratio: float = field(
        default=0.2, metadata={"help": "fraction of side-memory entries a shard may change (its random gradient mask)"}
    )
    n_iter: int = field(default=70, metadata={"help": "maximum SGD steps per edit (stops early once the loss settles)"})
    edit_lr: float = field(default=1.0, metadata={"help": "SGD learning rate of the side memory"})
    weight_decay: float = field(
        default=1e-5, metadata={"help": "SGD weight decay of the side memory (inside the mask)"}
    )
    norm_constraint: float = field(
        default=1.0, metadata={"help": "each side-memory entry stays within this distance of the main memory's"}
    )
    alpha: float = field(
        default=5.0, metadata={"help": "routing loss: irrelevant prompts' activation score is pushed below alpha"}
    )
    beta: float = field(
        default=20.0, metadata={"help": "routing loss: edit prompts' activation score is pushed above beta"}
    )
    gamma: float = field(
        default=10.0, metadata={"help": "routing loss: edit scores exceed irrelevant scores by at least gamma"}
    )
    act_ratio: float = field(
        default=0.88,
        metadata={"help": "routing threshold = act_ratio x the lowest edit activation score seen in training"},
    )
    save_freq: int = field(
        default=500, metadata={"help": "edits per knowledge shard; the next edit starts a new shard with a new mask"}
    )
    merge_freq: int = field(
        default=1000, metadata={"help": "every merge_freq edits the shards are TIES-merged into the side memory"}
    )
    merge_density: float = field(
        default=0.53, metadata={"help": "TIES: fraction of each shard's largest changes kept when merging"}
    )
    context_template_lengths: list[int] = field(
        default_factory=lambda: [5, 10],
        metadata={"help": "token lengths of the generated context prefixes of the edit prompt (model_args: '5|10')"},
    )
    context_templates_per_length: int = field(
        default=5, metadata={"help": "number of generated context prefixes per length"}
    )
    irrelevant_prompts: list[str] = field(
        default_factory=lambda: list(IRRELEVANT_PROMPTS),
        metadata={"help": "unrelated prompts that must not activate the side memory (model_args: 'a|b|c')"},
    )
    # not `seed`: that model_arg is taken by the xke model itself and would never reach the editor
    template_seed: int = field(default=0, metadata={"help": "seed of the context-template sampling"})
    mask_seed: int = field(default=0, metadata={"help": "seed of the shards' random gradient masks"})

    @property
    def module_name(self) -> str:
        return self.module_template.format(self.layer)

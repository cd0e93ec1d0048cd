"""Tiny random causal LMs with a byte-level tokenizer, for fast tests of editors and backends.

Every byte is a token, so any language (Chinese included) tokenizes. Used by this package's
tests and by plugin authors' tests; the models are random, so only mechanics can be tested on them.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
# A minimal chat template, so that --apply_chat_template and --system_instruction can be tested
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


#: Tiny model shapes of the depths and families users run editors on: name -> (architecture, blocks)
MODEL_SHAPES = {
    "llama4": ("llama", 4),
    "llama10": ("llama", 10),
    "llama16": ("llama", 16),
    "llama32": ("llama", 32),
    "qwen2": ("qwen2", 4),
    "gemma3": ("gemma3", 4),
    "gpt2": ("gpt2", 4),
}

#: MEMIT-family hyper-parameters for the tiny random models: their values are tiny (||v_init|| ~ 0.02), so no
#: decay, a loose clamp, few context templates, a small corpus
TINY_MEMIT_HPARAMS = dict(
    layers="1|2",
    context_template_lengths="5",
    context_templates_per_length=2,
    clamp_norm_factor=100.0,
    v_weight_decay=0.0,
    v_num_grad_steps=15,
    mom2_n_tokens=1500,
)


def byte_level_tokenizer():
    """A fast tokenizer with one token per byte plus ``<s>``, ``</s>``, ``<pad>``; adds ``<s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(arch: str = "llama", seed: int = 0, num_layers: int = 4):
    """A randomly initialised ``llama``, ``qwen2``, ``gemma3`` (``gemma3_text``) or ``gpt2`` model sized for CPU
    tests (head size 32)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    vocab_size = len(SPECIAL_TOKENS) + 256
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=num_layers, n_head=2, n_positions=512, **common)
    else:
        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}[arch]
        config = config_cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **({"sliding_window": 64} if arch == "gemma3" else {}),
            **common,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, num_layers: int = 4) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (a folder usable as ``pretrained=``)."""
    path = Path(path)
    tiny_causal_lm(arch, seed, num_layers).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def load_tiny(path: str | Path):
    """``(model, tokenizer)`` of a saved tiny model, in float32 and eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def parameter_hashes(model) -> dict[str, str]:
    """sha256 of every parameter's bytes: equal dicts mean a bit-identical model (the restore contract)."""
    import hashlib

    import torch

    def digest(tensor) -> str:
        return hashlib.sha256(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()

    return {name: digest(p) for name, p in model.named_parameters()}


def teacher_forced_argmax(model, tokenizer, requests) -> list[bool]:
    """Per ``EditRequest``: whether the argmax at every target position is the target token (the evaluation's EM)."""
    import torch

    from lm_eval_xke.editing.teacher_forcing import build_edit_batch

    batch = build_edit_batch(tokenizer, requests, next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = torch.arange(len(requests), device=logits.device)[:, None]
    hit = (logits[rows, batch.read_cols].argmax(-1) == batch.target_ids) | ~batch.target_mask
    return hit.all(1).tolist()


def capital_city_case(
    subject: str = "Ruritania", target: str = "Berlin", prompt: str | None = None, final: bool = False
) -> dict:
    """An lm-eval doc of one synthetic edit case: ``prompt`` (default ``"The capital city of {subject}"``, the
    subject last, where ROME on a random model can steer the next token) -> ``target``, asked with a pre-edit
    locality question, the reliability question and a post-edit locality question (plus ``final`` copies)."""
    from lm_eval_xke.cases import EditCase, EditRequest, Question, with_final_phase

    prompt = prompt or f"The capital city of {subject}"
    questions = (
        Question("locality", "en", "Water is made of", ("hydrogen",), phase="pre"),
        Question("reliability", "en", prompt, (target,)),
        Question("locality", "en", "Water is made of", ("hydrogen",)),
    )
    request = EditRequest(prompt=prompt, subject=subject, target_new=target, lang="en")
    return {"xke": EditCase(subject, (request,), with_final_phase(questions) if final else questions).to_doc()}


def loglikelihood_requests(doc: dict, doc_id: int, task: str = "t") -> list:
    """The loglikelihood instances lm-eval builds for ``doc``'s questions (answers scored after a space)."""
    from lm_eval.api.instance import Instance

    from lm_eval_xke.cases import EditCase

    return [
        Instance("loglikelihood", doc, (q.prompt, " " + q.answers[0]), idx, (task, doc_id, 1))
        for idx, q in enumerate(EditCase.from_doc(doc["xke"]).questions)
    ]


def train_tiny_editor(root: Path, model_dir: Path, editor: str, n_facts: int, *options: str) -> Path:
    """``lm-eval-xke train <editor> OPTIONS`` on ``model_dir`` over ``n_facts`` synthetic ``question<TAB>answer``
    lines written under ``root``; returns the trained folder."""
    from lm_eval_xke.cli import main

    data = root / "facts_en.txt"
    data.write_text("".join(f"Where is thing {i}?\tplace {i % 5}\n" for i in range(n_facts)), encoding="utf-8")
    out = root / editor
    args = ["train", editor, "--pretrained", str(model_dir), "--out", str(out), "--data", f"en={data}", *options]
    if main(args) != 0:
        raise RuntimeError(f"lm-eval-xke {' '.join(args)} failed")
    return out

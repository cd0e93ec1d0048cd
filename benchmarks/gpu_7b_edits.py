"""ROME and MEMIT edit timings on a randomly initialised Llama-2-7B-shaped model: what only a GPU shows.

One process, one model (random weights, bfloat16, built on the device; no download), the editors of this repository
through their plugin API (``get_editor(name)``, ``resolve_hparams``, ``apply``, ``AppliedEdit.restore``), every
hyper-parameter at the editor's default for the llama family except the key-statistics corpus, which is a file of
templated sentences written by this script. Measured, each timed with ``torch.cuda.synchronize`` around
``time.perf_counter``:

- the once-per-model work: the context prefixes of ROME and MEMIT, MEMIT's key statistics (second moments of the
  edited layers' keys, ``mom2_n_tokens`` tokens, written to a temporary cache) and reading them back from that cache;
- ROME, one edit (three different requests, each restored); MEMIT batches of 1 (three times), 10, 100 and 1000 edits
  (1000 only if its estimate from batch 100 fits the time budget, and never with ``--quick``);
- after every edit: ``restore()``, then the edited weights compared bit for bit with copies taken before the edit, and
  ``lm_eval_xke.stats.weights_fingerprint`` of the whole model compared with the unedited one;
- the forward cost per request (64 prompts of 128 tokens, a loglikelihood-style forward: full logits, float32
  log-softmax, the last 8 tokens' log-probs gathered; median of repeats) of the unedited model and of the model
  holding 100 MEMIT edits in place.

Peak memory per operation is ``torch.cuda.max_memory_allocated`` (reset before each). Tokens are bytes
(``lm_eval_xke.testing.byte_level_tokenizer``), so every text is 3-4 times as many tokens as with Llama's own
tokenizer: prompts, context prefixes and corpus documents are longer in tokens than in a real run, which makes the
timings pessimistic. lm-eval is not needed (ROME and MEMIT import none of it), nor an installed package: from a
bare copy of the tree, ``plugins/`` is loaded as ``lm_eval_xke.plugins``, and the output says so.

    python3 benchmarks/gpu_7b_edits.py --out results/gpu7b            # Llama-2-7B shape on cuda
    python3 benchmarks/gpu_7b_edits.py --out /tmp/tiny --shape tiny    # tiny llama (10 blocks), cpu without cuda
    python3 benchmarks/gpu_7b_edits.py --out /tmp/q --quick --set v_batch_size=32
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
#: editor name -> (module under lm_eval_xke.plugins, class), for a tree that is not pip-installed (no entry points)
EDITOR_CLASSES = {"rome": ("rome", "RomeEditor"), "memit": ("memit", "MemitEditor")}
LLAMA7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
FORWARD_PROMPTS, FORWARD_TOKENS, FORWARD_READS = 64, 128, 8


# ---------------------------------------------------------------- imports from a bare copy of the tree


def import_editor_modules() -> list[str]:
    """Make ``lm_eval_xke`` and its plugins importable from this tree; notes on how."""
    notes = []
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import lm_eval_xke

    if importlib.util.find_spec("lm_eval_xke.plugins") is None:  # the tree is not installed: plugins/ is the package
        spec = importlib.util.spec_from_file_location(
            "lm_eval_xke.plugins", REPO / "plugins" / "__init__.py", submodule_search_locations=[str(REPO / "plugins")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lm_eval_xke.plugins"] = module
        spec.loader.exec_module(module)
        lm_eval_xke.plugins = module
        notes.append(f"lm_eval_xke.plugins loaded from {REPO / 'plugins'} (the tree is not pip-installed)")
    return notes


def load_editor(name: str):
    """An instance of the editor registered as ``name`` (entry point; else registered from this tree)."""
    from lm_eval_xke.editors import EditorError, get_editor, register_editor

    try:
        return get_editor(name)()
    except (EditorError, ImportError):  # not installed: no entry points, or they point at another tree
        module, cls = EDITOR_CLASSES[name]
        register_editor(name, getattr(importlib.import_module(f"lm_eval_xke.plugins.{module}"), cls))
        return get_editor(name)()


# ---------------------------------------------------------------- model, requests, corpus


def build_model(shape: str, device: torch.device):
    """``(model, tokenizer, description)``: random weights, bfloat16 on cuda (float32 on cpu), eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lm_eval_xke.testing import MODEL_SHAPES, SPECIAL_TOKENS, byte_level_tokenizer, tiny_causal_lm

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    if shape == "tiny":
        arch, depth = MODEL_SHAPES["llama10"]  # ROME at block 2, MEMIT at 1-2: the 7B defaults placed at depth 10
        model = tiny_causal_lm(arch, seed=0, num_layers=depth).to(device)
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
    else:
        ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
        config = LlamaConfig(**LLAMA7B, **ids)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with device:  # weights are allocated and initialised on the device
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    assert len(tokenizer) <= model.config.vocab_size, "byte-level ids must fit the embedding"
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    description = (
        f"{shape}: LlamaForCausalLM, random weights (seed 0), {n_params / 1e6:,.1f} M parameters, hidden "
        f"{c.hidden_size}, {c.num_hidden_layers} layers, intermediate {c.intermediate_size}, {c.num_attention_heads} "
        f"heads, vocab {c.vocab_size}, {str(dtype).removeprefix('torch.')}; tokenizer byte-level "
        f"({len(tokenizer)} ids: {len(SPECIAL_TOKENS)} special + 256 bytes)"
    )
    return model, tokenizer, description


COUNTRY_HEADS = ("Vel", "Mar", "Tor", "Sel", "Kav", "Dru", "Lin", "Ost", "Bra", "Zen", "Pol", "Qua", "Rin", "Ul")
COUNTRY_TAILS = ("ania", "ovia", "istan", "land", "ria", "mark", "onia", "esia", "avia")
FIRST_NAMES = ("Anna", "Boris", "Clara", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luis")
FIRST_NAMES += ("Mara", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tara", "Viktor", "Wanda", "Yusuf")
LAST_NAMES = ("Albers", "Brandt", "Costa", "Dumas", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova", "Jansen")
LAST_NAMES += ("Kowalski", "Lindqvist", "Moreau", "Novak", "Oliveira", "Petrov", "Rossi", "Schmidt", "Tanaka", "Weber")
CITIES = ("Paris", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Cairo", "Lima", "Tokyo", "Seoul")
CITIES += ("Dublin", "Quito")
LANGUAGES = ("French", "German", "Spanish", "Portuguese", "Finnish", "Greek", "Polish", "Swahili", "Korean", "Dutch")
CURRENCIES = ("euro", "dollar", "peso", "krona", "rupee", "franc", "yen", "dinar", "pound", "zloty")
CONTINENTS = ("Europe", "Asia", "Africa", "South America", "North America", "Oceania")
JOBS = ("doctor", "lawyer", "teacher", "pilot", "chemist", "farmer", "painter", "journalist", "architect", "nurse")
INSTRUMENTS = ("piano", "violin", "guitar", "cello", "flute", "drums", "trumpet", "harp")
#: (prompt with {} for the subject, the targets); the subject ends the prompt or is followed by a few words
COUNTRY_RELATIONS = (
    ("The capital of {} is", CITIES),
    ("The official language of {} is", LANGUAGES),
    ("The currency of {} is the", CURRENCIES),
    ("{} is located in the continent of", CONTINENTS),
)
PERSON_RELATIONS = (
    ("{} works as a", JOBS),
    ("{} was born in", CITIES),
    ("{} plays the", INSTRUMENTS),
)


def edit_requests(n: int, seed: int = 0) -> list:
    """``n`` synthetic ``EditRequest``s (fictional countries and people, real targets), distinct while they last."""
    from lm_eval_xke.cases import EditRequest

    rng = random.Random(seed)
    countries = [head + tail for head in COUNTRY_HEADS for tail in COUNTRY_TAILS]
    people = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    pairs = [(s, r) for s in countries for r in COUNTRY_RELATIONS] + [(s, r) for s in people for r in PERSON_RELATIONS]
    rng.shuffle(pairs)
    requests = []
    for i in range(n):
        subject, (template, targets) = pairs[i % len(pairs)]
        target = rng.choice(targets)
        requests.append(EditRequest(prompt=template.format(subject), subject=subject, target_new=target, lang="en"))
    return requests


def write_corpus(path: Path, n_docs: int = 600, seed: int = 1) -> Path:
    """A ``.txt`` corpus, one document (6-10 templated sentences, ~500-800 bytes) per line."""
    rng = random.Random(seed)
    countries = [head + tail for head in COUNTRY_HEADS for tail in COUNTRY_TAILS]
    sentences = (
        "The river {c} flows through {city} before it reaches the sea.",
        "In {year}, {name} moved to {city} to work as a {job}.",
        "{country} is a small country in {continent}, and its people speak {language}.",
        "Most shops in {city} accept the {currency}, although some prefer cash.",
        "{name} learned to play the {instrument} at the age of {age}.",
        "The museum of {city} shows paintings from {country} and {country2}.",
        "Every summer, trains from {city} to {city2} are full of tourists.",
        "According to the census of {year}, {country} had {age} million inhabitants.",
    )
    docs = []
    for _ in range(n_docs):
        fields = lambda: dict(  # noqa: E731 - a fresh draw per sentence
            c=rng.choice(LAST_NAMES),
            city=rng.choice(CITIES),
            city2=rng.choice(CITIES),
            year=rng.randint(1850, 2020),
            name=f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            job=rng.choice(JOBS),
            country=rng.choice(countries),
            country2=rng.choice(countries),
            continent=rng.choice(CONTINENTS),
            language=rng.choice(LANGUAGES),
            currency=rng.choice(CURRENCIES),
            instrument=rng.choice(INSTRUMENTS),
            age=rng.randint(4, 80),
        )
        docs.append(" ".join(rng.choice(sentences).format(**fields()) for _ in range(rng.randint(6, 10))))
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall-clock seconds (device synchronised at both ends) and peak memory in GiB of the block."""
    record: dict[str, float] = {}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield record
    synchronize(device)
    record["seconds"] = time.perf_counter() - started
    record["peak_gib"] = peak_gib(device)


def peak_gib(device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` on cuda; on cpu the process's peak resident set (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def snapshot(model, module_names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the edited modules' weights, on the model's device."""
    return {f"{name}.weight": model.get_parameter(f"{name}.weight").detach().clone() for name in module_names}


def restore_check(model, saved: dict[str, torch.Tensor], fingerprint: str, edit) -> str:
    """``restore()`` the edit and say how it went: "ok ..." when the snapshotted weights are back bit for bit and
    the whole model's weights fingerprint is the unedited one, "FAIL ..." otherwise."""
    from lm_eval_xke.stats import weights_fingerprint

    touched = {delta.parameter for delta in edit.deltas}
    changed = [name for name in saved if not torch.equal(model.get_parameter(name), saved[name])]
    edit.restore()
    back = all(torch.equal(model.get_parameter(name), saved[name]) for name in saved)
    same_fingerprint = weights_fingerprint(model) == fingerprint
    unsaved = sorted(touched - set(saved))
    if back and same_fingerprint and not unsaved:
        caveat = "" if changed else "; the edit changed no weight (its update rounded away)"
        return f"ok ({len(changed)} weights changed, restored bit-exact{caveat})"
    return f"FAIL: bit-exact {back}, fingerprint {same_fingerprint}, edited but not snapshotted {unsaved}"


def value_summary(edit) -> tuple[float, float]:
    """Mean value-optimisation steps and the share of requests whose plain prompt then gave the target (argmax)."""
    records = edit.info.get("requests", [])
    if not records:
        return float("nan"), float("nan")
    return statistics.mean(r["steps"] for r in records), statistics.mean(float(r["plain_right"]) for r in records)


def forward_batch(tokenizer, corpus: Path, device: torch.device) -> torch.Tensor:
    """``FORWARD_PROMPTS`` rows of ``FORWARD_TOKENS`` token ids cut from the corpus."""
    ids = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        row = tokenizer(line)["input_ids"][:FORWARD_TOKENS]
        if len(row) == FORWARD_TOKENS:
            ids.append(row)
        if len(ids) == FORWARD_PROMPTS:
            break
    return torch.tensor(ids, device=device)


@torch.inference_mode()
def forward_seconds(model, input_ids: torch.Tensor, repeats: int, device: torch.device) -> list[float]:
    """Seconds per batch of loglikelihood-style forwards (full logits, float32 log-softmax, last reads gathered)."""
    times = []
    for i in range(repeats + 2):  # two warm-up passes
        synchronize(device)
        started = time.perf_counter()
        logits = model(input_ids=input_ids).logits
        log_probs = logits[:, -FORWARD_READS - 1 : -1].float().log_softmax(-1)
        log_probs.gather(-1, input_ids[:, -FORWARD_READS:, None]).sum().item()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    """Every measurement; the statistics cache and the corpus live in a temporary folder, removed after."""
    scratch = Path(tempfile.mkdtemp(prefix="xke-gpu7b-"))
    try:
        return measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    notes = import_editor_modules()
    from lm_eval_xke.stats import key_statistics, weights_fingerprint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started_run = time.perf_counter()
    os.environ["XKE_CACHE_DIR"] = str(scratch / "cache")  # a fresh statistics cache: nothing is reused from before
    corpus = write_corpus(scratch / "corpus.txt")
    rows: list[dict] = []

    def report(operation: str, edits: int | None, rec: dict[str, float], note: str = "", **extra: Any) -> None:
        row = {"operation": operation, "edits": edits, **rec, "note": note, **extra}
        if edits:
            row["seconds_per_edit"] = rec["seconds"] / edits
        rows.append(row)
        per_edit = f", {row['seconds_per_edit']:.3f} s/edit" if edits else ""
        print(
            f"  {operation}: {rec['seconds']:.2f} s{per_edit}, peak {rec['peak_gib']:.1f} GiB"
            + (f" ({note})" if note else ""),
            flush=True,
        )

    print(f"device: {device_name(device)}; torch {torch.__version__}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    with measured(device) as rec:
        model, tokenizer, description = build_model(args.shape, device)
    print(f"model: {description}", flush=True)
    report("build model (random init on the device)", None, rec)
    fingerprint = weights_fingerprint(model)

    overrides = dict(o.split("=", 1) for o in args.overrides)
    num_layers = model.config.num_hidden_layers
    model_type = model.config.model_type
    rome, memit = load_editor("rome"), load_editor("memit")
    corpus_overrides = {"mom2_corpus": str(corpus)}
    rome_hp = rome.resolve_hparams(model_type, None, {**corpus_overrides, **overrides}, num_layers, None)
    memit_hp = memit.resolve_hparams(model_type, None, {**corpus_overrides, **overrides}, num_layers, None)
    settings = {
        "rome": {k: v for k, v in rome_hp.to_dict().items() if k != "mom2_corpus"},
        "memit": {k: v for k, v in memit_hp.to_dict().items() if k != "mom2_corpus"},
    }
    print(
        f"ROME: layer {rome_hp.layer}, mom2_adjustment {rome_hp.mom2_adjustment}, prefixes "
        f"{rome_hp.context_templates_per_length} x {rome_hp.context_template_lengths} tokens; MEMIT: layers "
        f"{memit_hp.layers}, prefixes {memit_hp.context_templates_per_length} x {memit_hp.context_template_lengths} "
        f"tokens, lambda_per_width {memit_hp.lambda_per_width}, "
        f"mom2_n_tokens {memit_hp.mom2_n_tokens}; both: v_num_grad_steps {memit_hp.v_num_grad_steps}, "
        f"v_batch_size {memit_hp.v_batch_size}, early_stop_loss {memit_hp.early_stop_loss}; overrides {overrides}",
        flush=True,
    )
    requests = iter(edit_requests(3 + 3 + 10 + 100 + 1000))  # every edit of the run its own request

    print("once per model:", flush=True)
    with measured(device) as rec:
        rome_templates = rome.context_templates(model, tokenizer, rome_hp)
    report("ROME context prefixes", None, rec, f"{len(rome_templates)} templates, sampled on the model")
    with measured(device) as rec:
        memit_templates = memit.context_templates(model, tokenizer, memit_hp)
    report("MEMIT context prefixes", None, rec, f"{len(memit_templates)} templates")
    stats_note = (
        f"{len(memit_hp.layers)} layers x {memit_hp.mom2_n_tokens} tokens of a templated-sentence corpus, "
        f"{memit_hp.mom2_dtype}, batch {memit_hp.mom2_batch_size} docs, incl. writing the disk cache"
    )
    with measured(device) as rec:
        memit.second_moments(model, tokenizer, memit_hp)
    report("MEMIT key statistics", None, rec, stats_note)
    with measured(device) as rec:
        key_statistics(
            model, tokenizer, memit_hp.module_names(), memit_hp.mom2_corpus, memit_hp.mom2_n_tokens,
            memit_hp.mom2_dtype, memit_hp.mom2_batch_size,
        )  # fmt: skip
    report("MEMIT key statistics from the disk cache", None, rec, "checked and loaded, not recomputed")

    def edit(operation: str, editor, hp, batch: list, module_names: list[str], hold: Callable[[], None] | None = None):
        saved = snapshot(model, module_names)
        with measured(device) as rec:
            applied = editor.apply(model, tokenizer, batch, hp)
        steps, plain_right = value_summary(applied)
        value_seconds = applied.info.get("value_seconds")  # MEMIT: the value optimisation's share of the time
        if hold is not None:  # measured while the edit is in place
            hold()
        check = restore_check(model, saved, fingerprint, applied)
        del saved, applied
        note = f"value steps mean {steps:.1f}, plain prompt right {plain_right:.0%}; restore {check}"
        if value_seconds is not None:
            note = f"values {value_seconds:.2f} s + spread {rec['seconds'] - value_seconds:.2f} s; {note}"
        extra = dict(value_steps_mean=steps, plain_right=plain_right, value_seconds=value_seconds, restore=check)
        report(operation, len(batch), rec, note, **extra)
        if not check.startswith("ok"):
            raise SystemExit(f"restore check failed after {operation}: {check}")

    print("edits (each restored and checked):", flush=True)
    for i in range(3):
        edit(f"ROME 1 edit (#{i + 1})", rome, rome_hp, [next(requests)], [rome_hp.module_name])
    for i in range(3):
        edit(f"MEMIT batch 1 (#{i + 1})", memit, memit_hp, [next(requests)], memit_hp.module_names())
    edit("MEMIT batch 10", memit, memit_hp, [next(requests) for _ in range(10)], memit_hp.module_names())

    # the forward cost per request: unedited before and after the batch of 100, and while it is held in place
    input_ids = forward_batch(tokenizer, corpus, device)
    forward = {"unedited": forward_seconds(model, input_ids, args.forward_repeats, device)}

    def hold() -> None:
        forward["edited"] = forward_seconds(model, input_ids, args.forward_repeats, device)

    batch100 = [next(requests) for _ in range(100)]
    edit("MEMIT batch 100", memit, memit_hp, batch100, memit_hp.module_names(), hold=hold)
    forward["unedited"] += forward_seconds(model, input_ids, args.forward_repeats, device)
    for name, label in (("unedited", "unedited (before and after)"), ("edited", "holding 100 MEMIT edits")):
        times = forward[name]
        median = statistics.median(times)
        rows.append(
            {
                "operation": f"forward, {label}",
                "edits": None,
                "seconds": median,
                "seconds_per_request": median / FORWARD_PROMPTS,
                "repeats": times,
                "peak_gib": None,
                "note": f"{FORWARD_PROMPTS} prompts x {FORWARD_TOKENS} tokens per batch, median of {len(times)} "
                f"batches (min {min(times):.3f} s, max {max(times):.3f} s)",
            }
        )
        print(f"  forward, {label}: {median / FORWARD_PROMPTS * 1e3:.3f} ms/request", flush=True)
    ratio = statistics.median(forward["edited"]) / statistics.median(forward["unedited"])
    rows[-1]["note"] += f"; {ratio:.3f} x the unedited median"

    per_edit_100 = next(r for r in rows if r["operation"] == "MEMIT batch 100")["seconds_per_edit"]
    estimate = 1000 * per_edit_100 * 1.1
    elapsed = time.perf_counter() - started_run
    batch1000 = [next(requests) for _ in range(1000)]
    if args.quick:
        skipped = "skipped (--quick)"
    elif elapsed + estimate > args.budget_s:
        skipped = f"skipped: {elapsed:.0f} s so far + {estimate:.0f} s estimated > --budget-s {args.budget_s:.0f}"
    else:
        skipped = ""
        try:
            edit("MEMIT batch 1000", memit, memit_hp, batch1000, memit_hp.module_names())
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            intact = weights_fingerprint(model) == fingerprint
            skipped = f"out of memory ({str(err).splitlines()[0][:120]}); weights intact after it: {intact}"
    if skipped:
        note = f"estimate: 1000 x batch 100's {per_edit_100:.3f} s/edit x 1.1; {skipped}"
        rows.append(
            {
                "operation": "MEMIT batch 1000 (estimate, not run)",
                "edits": 1000,
                "seconds": estimate,
                "seconds_per_edit": estimate / 1000,
                "peak_gib": None,
                "note": note,
            }
        )
        print(f"  MEMIT batch 1000: {skipped}; estimated {estimate:.0f} s", flush=True)

    total = time.perf_counter() - started_run
    return {
        "device": device_name(device),
        "model": description,
        "shape": args.shape,
        "versions": versions(),
        "notes": notes,
        "settings": settings,
        "overrides": overrides,
        "requests_example": [vars(r) for r in batch100[:3]],
        "token_counts": token_counts(tokenizer, batch100, corpus, rome_templates, memit_templates),
        "rows": rows,
        "total_seconds": total,
        "how": HOW,
    }


HOW = (
    "Seconds: wall clock around each operation, torch.cuda.synchronize at both ends; peak GiB: "
    "torch.cuda.max_memory_allocated, reset before each operation (cpu: process peak RSS, never reset); "
    "random weights, so value optimisations rarely converge early: steps are near the default maximum "
    "(an upper bound of a trained model's time); byte-level tokens (1 per byte, ~3-4x Llama's tokenizer); "
    "editor defaults for the llama family except the corpus of the key statistics; every edit restored and "
    "checked bit for bit (edited weights) and by weights_fingerprint (whole model)."
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def token_counts(tokenizer, requests: list, corpus: Path, rome_templates: list[str], memit_templates: list[str]):
    """Mean token counts of what the editors read, so the timings can be scaled to another tokenizer."""

    def mean_len(texts: list[str]) -> float:
        return statistics.mean(len(tokenizer(t)["input_ids"]) for t in texts)

    docs = corpus.read_text(encoding="utf-8").splitlines()
    return {
        "prompt_mean": mean_len([r.prompt for r in requests]),
        "target_mean": mean_len([" " + r.target_new for r in requests]) - 1,  # minus <s>
        "rome_prefix_mean": mean_len([t.format("") for t in rome_templates[1:]]),
        "memit_prefix_mean": mean_len([t.format("") for t in memit_templates[1:]]),
        "corpus_doc_mean": mean_len(docs[:100]),
    }


def markdown(result: dict) -> str:
    """The results as a markdown table, with how they were measured."""
    memory = "peak GPU memory GiB" if result["device"].startswith("cuda") else "peak RSS GiB (process, cpu)"
    counts = ", ".join(f"{name} {value:.1f}" for name, value in result["token_counts"].items())
    lines = [
        f"# ROME / MEMIT edit timings, {result['shape']} shape",
        "",
        f"- device: {result['device']}; versions: {result['versions']}",
        f"- model: {result['model']}",
        f"- mean token counts (byte-level): {counts}",
        f"- overrides: {result['overrides'] or 'none (editor defaults)'}",
        *[f"- note: {note}" for note in result["notes"]],
        f"- how: {result['how']}",
        f"- total: {result['total_seconds']:.0f} s",
        "",
        f"| operation | edits | seconds total | seconds per edit | {memory} | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        per = row.get("seconds_per_edit")
        if "seconds_per_request" in row:
            per_text = f"{row['seconds_per_request'] * 1e3:.2f} ms/request"
        else:
            per_text = f"{per:.3f}" if per is not None else ""
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(
            f"| {row['operation']} | {row['edits'] or ''} | {row['seconds']:.2f} | {per_text} | {peak} "
            f"| {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.md and results.json")
    parser.add_argument("--shape", choices=("llama7b", "tiny"), default="llama7b", help="model shape (default llama7b)")
    parser.add_argument("--quick", action="store_true", help="no MEMIT batch of 1000 (estimated from 100 instead)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="run batch 1000 only if it fits (default 300)")
    parser.add_argument("--forward-repeats", type=int, default=5, help="timed forward batches (default 5)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on cpu (default 1: the tiny model gains nothing from more)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE hyper-parameter for ROME and MEMIT"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    table = markdown(result)
    (out / "results.md").write_text(table, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print(table, flush=True)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}", flush=True)


if __name__ == "__main__":
    main()

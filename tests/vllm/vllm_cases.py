"""Edit cases, requests and comparisons shared by the vLLM tests."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from lm_eval.api.instance import Instance

from lm_eval_xke.cases import EditCase, EditRequest, Question, with_final_phase
from lm_eval_xke.editors import AppliedEdit, apply_weight_deltas
from lm_eval_xke.plugins.rome import RomeEditor

# On a random tiny model ROME can steer only the token predicted at the edited (subject-last) position, so the
# subject ends the prompt; the loose clamp and no decay let it move a random model's tiny MLP outputs.
TINY_ROME = dict(
    layer=1, context_template_lengths=5, context_templates_per_length=5, clamp_norm_factor=100.0, v_weight_decay=0.0
)
FACTS = (("Ruritania", "Berlin"), ("Freedonia", "Tokyo"), ("Elbonia", "Paris"), ("Genovia", "Lima"))
GREEDY = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}


class ReplayedRome(RomeEditor):
    """ROME whose deltas are optimised once per model folder, requests and settings, then replayed: every test
    of the session sees the same ROME edits for one optimisation each. Valid from the clean model only (not in
    edit_mode=sequential, where an edit is computed on the model as edited so far)."""

    name = "rome_replayed"
    computed: ClassVar[dict[tuple, tuple]] = {}

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        key = (model.name_or_path, tuple(requests), repr(hparams))
        if key in self.computed:
            return apply_weight_deltas(model, self.computed[key])
        edit = super().apply(model, tokenizer, requests, hparams)
        self.computed[key] = edit.deltas
        return edit


def edit_doc(subject: str, target: str, sequential: bool = False) -> dict:
    prompt = f"The capital city of {subject}"
    questions = (
        Question("locality", "en", "Water is made of", ("hydrogen",), phase="pre"),
        Question("reliability", "en", prompt, (target,)),
        Question("generality", "en", f"Which city is the capital of {subject}", (target,)),
        Question("locality", "en", "Water is made of", ("hydrogen",)),
    )
    source = {}
    if sequential:
        questions, source = with_final_phase(questions), {"final_phase": True}
    case = EditCase(subject, (EditRequest(prompt, subject, target, "en"),), questions, source)
    return {"xke": case.to_doc()}


def requests(protocol: str, sequential: bool = False, facts=FACTS) -> list[Instance]:
    """Every question of every fact as lm-eval requests: teacher-forced (`loglikelihood`) or `generate_until`."""
    out = []
    for doc_id, (subject, target) in enumerate(facts):
        doc = edit_doc(subject, target, sequential)
        for idx, q in enumerate(EditCase.from_doc(doc["xke"]).questions):
            if protocol == "loglikelihood":
                arguments = (q.prompt, " " + q.answers[0])
            else:
                arguments = (q.prompt, dict(GREEDY))
            out.append(Instance(protocol, doc, arguments, idx, ("t", doc_id, 1)))
    return out


def answer(lm, protocol: str, instances: list[Instance]) -> list:
    return lm.loglikelihood(instances) if protocol == "loglikelihood" else lm.generate_until(instances)


def assert_same_answers(ours: list, reference: list) -> None:
    """Generations equal; read-outs equal in answer, ids and greediness, log-likelihoods within float32 noise."""
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        if isinstance(theirs, str):
            assert mine == theirs
        else:
            assert json.loads(mine[2]) == json.loads(theirs[2])
            assert mine[1] == theirs[1]
            assert mine[0] == pytest.approx(theirs[0], abs=1e-3)


def edited_first_token(response) -> bool:
    """Whether a read-out's first answer token is the target's joining space (the tiny model's edit landed)."""
    return json.loads(response[2])["answer"].startswith(" ")

"""A ConfigurableTask whose docs are edit cases: one request per question of ``doc["xke"]``.

Each question is rendered through the YAML's ``doc_to_text`` template (the question text is
bound to ``prompt``) with the run's system instruction and chat template, exactly as lm-eval
renders ordinary docs. ``loglikelihood`` tasks read out ``target_delimiter + answers[0]`` teacher-forced;
``generate_until`` tasks generate with the YAML's ``generation_kwargs``.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from lm_eval_xke.cases import EditCase
from lm_eval_xke.failed_edits import failed_answer


class EditCaseTask(ConfigurableTask):
    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # lm-eval passes the whole YAML dict, `class` key included, which TaskConfig rejects
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        self._render_options: dict[str, Any] = {}
        super().__init__(config=config, **kwargs)

    def build_all_requests(self, **kwargs: Any) -> None:
        # construct_requests receives one rendered context; keep the rendering options to render every question
        self._render_options = {
            "system_instruction": kwargs.get("system_instruction"),
            "apply_chat_template": kwargs.get("apply_chat_template", False),
            "fewshot_as_multiturn": kwargs.get("fewshot_as_multiturn", False),
            "chat_template": kwargs.get("chat_template"),
        }
        super().build_all_requests(**kwargs)

    def render_question(self, doc: dict, prompt: str) -> str:
        return self.fewshot_context(
            {**doc, "prompt": prompt}, num_fewshot=0, gen_prefix=self.doc_to_prefix(doc), **self._render_options
        )

    def construct_requests(self, doc: dict, ctx: Any, **kwargs: Any) -> list[Instance]:
        case = EditCase.from_doc(doc["xke"])
        metadata = kwargs["metadata"]
        delimiter = self.config.target_delimiter
        if self._render_options.get("apply_chat_template") and not self.config.gen_prefix:
            delimiter = ""  # the chat template already ends the prompt with the assistant turn
        instances = []
        for idx, question in enumerate(case.questions):
            context = self.render_question(doc, question.prompt)
            if self.OUTPUT_TYPE == "loglikelihood":
                arguments = (context, f"{delimiter}{question.answers[0]}")
            elif self.OUTPUT_TYPE == "generate_until":
                arguments = (context, dict(self.config.generation_kwargs or {}))
            else:
                raise ValueError(f"{self.config.task}: edit-case tasks support loglikelihood and generate_until")
            instances.append(
                Instance(request_type=self.OUTPUT_TYPE, doc=doc, arguments=arguments, idx=idx, metadata=metadata)
            )
        return instances


class ParallelEditTask(EditCaseTask):
    """An edit-case task whose metric keys follow from its docs: the test languages are a run option
    (``xke_test_langs``), so the YAML cannot list them. Every key is a mean over cases; ``old_answer_*`` is the
    one where lower is better. The keys are those ``process_results`` gives a case whose every answer failed."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        doc = next(iter(self.test_docs()))
        case = EditCase.from_doc(doc["xke"])
        probe = [failed_answer(self.OUTPUT_TYPE, ("", q.answers[0]), "metric keys") for q in case.questions]
        keys = list(self.config.process_results(doc, probe))
        self._aggregation_list = {key: mean for key in keys}
        self._higher_is_better = {key: not key.startswith("old_answer_") for key in keys}

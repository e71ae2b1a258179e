"""How the graph's scores become probabilities and answers: the model's own head.

`auto` applies transformers' rule (the text-classification pipeline's `function_to_apply`):
no function for problem_type = regression or a graph that already ends in Softmax or
Sigmoid, sigmoid for problem_type = multi_label_classification or a single label,
softmax otherwise. A multi-label model's answer lists every label at or above a
threshold; a single-label model may abstain below a confidence, naming a fallback label
and still reporting its best guess.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from batcher.config import OutputSettings
from batcher.model.bundle import DECLARATION, declared_settings

Function = Literal["softmax", "sigmoid", "none"]
FUNCTIONS: tuple[Function, ...] = ("softmax", "sigmoid", "none")


@dataclass(frozen=True)
class Head:
    """A model's output function and answer rules, resolved."""

    function: Function = "softmax"
    function_from: str = "transformers' rule: more than one label"
    multi_label: bool = False
    threshold: float = 0.5
    abstain_threshold: float = 0.0
    abstain_label: str = "none"
    output: str | None = None
    """The output tensor to read (None: the session picks `logits` or the only output)."""

    def apply(self, logits: np.ndarray, function: Function | None = None) -> np.ndarray:
        """Scores of each row (rows x labels, float32) under `function` (default: the model's)."""
        return activate(logits, function or self.function)

    def describe(self) -> str:
        parts = [f"{self.function} ({self.function_from})"]
        if self.multi_label:
            parts.append(f"multi-label: labels at or above {self.threshold:g}")
        if self.abstain_threshold:
            parts.append(f"abstains as {self.abstain_label!r} below {self.abstain_threshold:g}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def settings_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, ensure_ascii=False)


def activate(logits: np.ndarray, function: Function) -> np.ndarray:
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        result: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
        return result
    if function == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float32)
    return logits


def resolve_output(
    settings: OutputSettings,
    declared: dict[str, Any],
    *,
    problem_type: str | None,
    num_labels: int,
    final_op: str | None = None,
) -> Head:
    """The head from [model.output] over the bundle's declaration over `auto`. `final_op`:
    the operator that computes the graph's output (Softmax and Sigmoid mean it already gives
    probabilities)."""
    checked = declared_settings(declared, "output", settings)
    function: Function
    if checked.function not in (None, "auto"):
        function = checked.function  # type: ignore[assignment]
        why = "model.output.function" if settings.function else f"{DECLARATION}"
    elif final_op in ("Softmax", "Sigmoid"):
        function, why = "none", f"the graph ends in {final_op}: its output is already probabilities"
    elif problem_type == "regression":
        function, why = "none", "problem_type = regression"
    elif problem_type == "multi_label_classification":
        function, why = "sigmoid", "problem_type = multi_label_classification"
    elif num_labels == 1:
        function, why = "sigmoid", "one label"
    else:
        function, why = "softmax", "transformers' rule: more than one label"
    multi_label = num_labels > 1 and (
        problem_type == "multi_label_classification"
        or (final_op == "Sigmoid" and checked.function in (None, "auto"))
        or function == "sigmoid"
    )
    return Head(
        function=function,
        function_from=why,
        multi_label=multi_label,
        threshold=checked.threshold if checked.threshold is not None else 0.5,
        abstain_threshold=checked.abstain_threshold or 0.0,
        abstain_label=checked.abstain_label or "none",
        output=checked.name or None,
    )

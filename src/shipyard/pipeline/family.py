"""Model families: how one kind of model is loaded, exported, judged and compressed.

Every build runs the same steps (load, convert, evaluate, then optimize when the spec asks); each step asks
the spec's family to do its part. The tensor family covers ONNX, PyTorch, scikit-learn and Hugging Face
encoders (one graph run per request); the language family, causal language models served token by token
(language.py). Both optimize through the one search loop (optimize/search.py), with their own judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.convert import convert
from shipyard.pipeline.evaluate import evaluate
from shipyard.pipeline.load import load
from shipyard.pipeline.optimize.search import Judge, optimize
from shipyard.pipeline.optimize.tensor_judge import TensorJudge
from shipyard.pipeline.step import ActionStep, Progress, Step
from shipyard.spec.models import ShipyardSpec

StepAction = Callable[[BuildContext, Progress], dict[str, Any]]


class Family(Protocol):
    descriptions: ClassVar[dict[str, str]]  # each step's progress line

    def load(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]: ...

    def convert(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]: ...

    def evaluate(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]: ...

    def judge(self, ctx: BuildContext) -> Judge:
        """The optimize search's judge, once evaluate has measured the unoptimized model."""
        ...

    def last_steps(self) -> list[Step]:
        """Steps after the search (the language family's: the graph the server runs)."""
        ...


class TensorFamily:
    descriptions: ClassVar[dict[str, str]] = {
        "load": "Load model and data",
        "convert": "Convert to ONNX and verify",
        "evaluate": "Evaluate and time",
        "optimize": "Optimize (guarded search)",
    }

    def load(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        return load(ctx, progress)

    def convert(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        return convert(ctx, progress)

    def evaluate(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        return evaluate(ctx, progress)

    def judge(self, ctx: BuildContext) -> Judge:
        return TensorJudge(ctx)

    def last_steps(self) -> list[Step]:
        return []


def family_of(spec: ShipyardSpec) -> Family:
    if spec.model.generates:  # imports PyTorch and transformers: only for the builds that need them
        from shipyard.pipeline.language import LanguageFamily

        return LanguageFamily()
    return TensorFamily()


def build_steps(spec: ShipyardSpec) -> list[Step]:
    """The steps of a build of `spec`, in order."""
    family = family_of(spec)
    actions: dict[str, StepAction] = {"load": family.load, "convert": family.convert, "evaluate": family.evaluate}
    if spec.optimize is not None:
        actions["optimize"] = lambda ctx, progress: optimize(ctx, progress, family.judge(ctx))
    steps: list[Step] = [ActionStep(name, family.descriptions[name], action) for name, action in actions.items()]
    return [*steps, *family.last_steps()]

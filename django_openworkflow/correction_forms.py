"""The "Resume with changes" form of the run pages: what a person gives a failed run,
checked before it is applied, and the diff shown before they confirm.

No HTTP here (``views.run_correct`` drives it) and no state change: the values
go to ``WorkflowRun.objects.resume(run, input=..., step_outputs=...,
expected_generation=...)``, which checks them again under the run's row lock
(``corrections.Correction``). The value checks are the manager's own
(``serialization.ensure_json``), so the form refuses what the manager would.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django import forms
from django.core.exceptions import ValidationError
from django.forms import formset_factory
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .corrections import NOT_GIVEN
from .display import error_summary, pretty_json
from .serialization import ensure_json

if TYPE_CHECKING:
    from .models import WorkflowRun

MAX_STEP_FORMS = 1000  # a run stores at most 1000 attempts a generation
DIFF_CONTEXT = 5  # unchanged lines shown around each change


# --- the run's failed steps ------------------------------------------------------


@dataclass(frozen=True)
class FailedStep:
    """A step of the run's current generation whose last attempt failed: the steps a
    person may give an output for."""

    name: str
    error: Any  # the stored error of its last failed attempt

    @property
    def error_text(self) -> str:
        return error_summary(self.error)


def failed_steps(run: WorkflowRun) -> list[FailedStep]:
    """The run's failed steps, in the order they first failed: the steps the manager lets
    a resume give an output (``WorkflowRun.correctable_steps()``, one query)."""
    return [
        FailedStep(name=name, error=attempt.error)
        for name, attempt in run.correctable_steps().items()
    ]


# --- reading JSON from a text field ----------------------------------------------


def parse_json(text: str, what: str) -> Any:
    """The JSON value of ``text``; a ``ValidationError`` naming ``what`` when it is not one.

    A syntax error says where (line and column); a value is refused for what
    the manager refuses it (not plain JSON: NaN, floats of 1e16 and more, NUL
    in a string; too large for ``MAX_PAYLOAD_BYTES``; nested too deeply).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            _("%(what)s is not valid JSON: %(problem)s (line %(line)d, column %(column)d)."),
            code="json",
            params={"what": what, "problem": exc.msg, "line": exc.lineno, "column": exc.colno},
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
        raise ValidationError(
            _("%(what)s cannot be read as JSON: %(problem)s."),
            code="json",
            params={"what": what, "problem": str(exc) or type(exc).__name__},
        ) from None
    try:
        ensure_json(value, what)
    except (TypeError, ValueError) as exc:
        raise ValidationError(str(exc), code="value") from None
    return value


def same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are equal as JSON (``1`` and ``true`` are not; key order
    does not count, as the databases do not keep it)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --- the forms ---------------------------------------------------------------------


def json_textarea(rows: int) -> forms.Textarea:
    return forms.Textarea(attrs={"rows": rows, "spellcheck": "false", "class": "owf-json-field"})


class CorrectionForm(forms.Form):
    """The run's input, and the generation the form was made for (hidden)."""

    input = forms.CharField(
        label=gettext_lazy("Input"), required=False, strip=False, widget=json_textarea(12)
    )
    generation = forms.IntegerField(min_value=0, widget=forms.HiddenInput)

    def clean_input(self) -> Any:
        text = self.cleaned_data["input"]
        if not text.strip():
            raise ValidationError(_("Enter the input as JSON (null for none)."), code="required")
        return parse_json(text, _("The input"))


class StepOutputForm(forms.Form):
    """One failed step: whether to use an output instead, and that output as JSON."""

    name = forms.CharField(widget=forms.HiddenInput, strip=False)
    use = forms.BooleanField(label=gettext_lazy("Use this output instead"), required=False)
    output = forms.CharField(
        label=gettext_lazy("Output"), required=False, strip=False, widget=json_textarea(4)
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not data.get("use") or "name" not in data:
            return data
        what = _('The output of step "%(name)s"') % {"name": data["name"]}
        text = data.get("output") or ""
        if not text.strip():
            self.add_error(
                "output",
                ValidationError(
                    _("%(what)s is empty: enter it as JSON (null for none)."),
                    code="required",
                    params={"what": what},
                ),
            )
            return data
        try:
            data["value"] = parse_json(text, what)
        except ValidationError as exc:
            self.add_error("output", exc)
        return data


StepOutputFormSet = formset_factory(
    StepOutputForm,
    extra=0,
    max_num=MAX_STEP_FORMS,
    absolute_max=MAX_STEP_FORMS,
    validate_max=True,
)

STEPS_PREFIX = "step"


def blank_forms(run: WorkflowRun, failed: list[FailedStep]) -> tuple[CorrectionForm, Any]:
    """The form for the run as it is: its input, and no output given for any step."""
    form = CorrectionForm(
        initial={"input": pretty_json(run.input), "generation": run.resume_generation}
    )
    formset = StepOutputFormSet(
        initial=[{"name": step.name} for step in failed], prefix=STEPS_PREFIX
    )
    return form, formset


def posted_forms(data: Any) -> tuple[CorrectionForm, Any]:
    return CorrectionForm(data), StepOutputFormSet(data, prefix=STEPS_PREFIX)


# --- the change the forms ask for ----------------------------------------------------


@dataclass
class Changes:
    """What the confirmed form asks the manager for: the keyword arguments of ``resume``."""

    generation: int
    input: Any = NOT_GIVEN
    step_outputs: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.input is not NOT_GIVEN or bool(self.step_outputs)

    def resume_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"expected_generation": self.generation}
        if self.input is not NOT_GIVEN:
            kwargs["input"] = self.input
        if self.step_outputs:
            kwargs["step_outputs"] = dict(self.step_outputs)
        return kwargs


def read_correction(run: WorkflowRun, form: CorrectionForm, formset: Any) -> Changes | None:
    """The change asked for by valid forms; None (with a form error) when nothing changes.

    The input counts only when it differs from the stored one, so a correction
    of a step's output alone does not rewrite the input.
    """
    correction = Changes(generation=form.cleaned_data["generation"])
    if not same_json(form.cleaned_data["input"], run.input):
        correction.input = form.cleaned_data["input"]
    for step_form in formset.forms:
        data = step_form.cleaned_data
        if data.get("use"):
            correction.step_outputs[data["name"]] = data["value"]
    if not correction:
        form.add_error(
            None,
            ValidationError(
                _(
                    "Nothing to change: edit the input or give a step's output. (The Resume "
                    "button resumes the run as it is.)"
                ),
                code="unchanged",
            ),
        )
        return None
    return correction


def unknown_steps(correction: Changes, failed: list[FailedStep]) -> list[str]:
    """The steps given an output that are not failed steps of the run's current generation."""
    names = {step.name for step in failed}
    return [name for name in correction.step_outputs if name not in names]


# --- the diff shown before confirming ------------------------------------------------


@dataclass(frozen=True)
class DiffLine:
    kind: str  # "file", "hunk", "add", "del" or "context": the CSS class owf-diff-<kind>
    text: str


@dataclass(frozen=True)
class Diff:
    title: str
    lines: list[DiffLine]


def unified_diff(old: str, new: str, *, old_label: str, new_label: str) -> list[DiffLine]:
    """A unified diff of two texts, line by line, each line with its kind (plain text:
    the template escapes it)."""
    lines = difflib.unified_diff(
        old.splitlines(),
        new.splitlines(),
        fromfile=old_label,
        tofile=new_label,
        lineterm="",
        n=DIFF_CONTEXT,
    )
    return [DiffLine(_line_kind(line), line) for line in lines]


def _line_kind(line: str) -> str:
    if line.startswith(("--- ", "+++ ")):
        return "file"
    if line.startswith("@@"):
        return "hunk"
    return {"+": "add", "-": "del"}.get(line[:1], "context")


def correction_diffs(run: WorkflowRun, correction: Changes, failed: list[FailedStep]) -> list[Diff]:
    """The input (old and new pretty JSON) and each step (its error, the output given)."""
    diffs = []
    if correction.input is not NOT_GIVEN:
        diffs.append(
            Diff(
                _("Input"),
                unified_diff(
                    pretty_json(run.input),
                    pretty_json(correction.input),
                    old_label=_("input (stored)"),
                    new_label=_("input (new)"),
                ),
            )
        )
    errors = {step.name: step.error_text for step in failed}
    for name, value in correction.step_outputs.items():
        diffs.append(
            Diff(
                _("Step “%(name)s”") % {"name": name},
                unified_diff(
                    errors.get(name, ""),
                    pretty_json(value),
                    old_label=_("%(name)s: the error") % {"name": name},
                    new_label=_("%(name)s: the output given") % {"name": name},
                ),
            )
        )
    return diffs

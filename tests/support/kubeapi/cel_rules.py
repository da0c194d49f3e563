"""``x-kubernetes-validations`` rules, evaluated with a real CEL implementation.

We use ``common-expression-language`` (Python bindings of the Rust ``cel`` crate): it
compiles the rules once, evaluates in microseconds and, unlike a permissive stand-in,
keeps CEL's strict typing (``1 < 2.5`` is an error), which is how cel-go in the API
server behaves.  Kubernetes adds libraries on top of standard CEL (strings, lists,
``quantity``, ``url``, ...); the list/string helpers rules commonly use are added
below, the rest are reported as an emulator limitation (an internal error) rather
than silently passing an object the real server would judge.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cel


def _is_sorted(items: list[Any]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(items))


# Kubernetes CEL library functions (k8s.io/apiserver/pkg/cel/library), member-style calls
# receive the receiver as the first argument.
K8S_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "isSorted": _is_sorted,
    "sum": sum,
    "min": min,
    "max": max,
    "indexOf": lambda haystack, needle: haystack.index(needle) if needle in haystack else -1,
    "lastIndexOf": lambda haystack, needle: (
        len(haystack) - 1 - haystack[::-1].index(needle) if needle in haystack else -1
    ),
    "lowerAscii": lambda s: s.lower(),
    "upperAscii": lambda s: s.upper(),
    "trim": lambda s: s.strip(),
    "join": lambda items, sep="": sep.join(items),
    "split": lambda s, sep: s.split(sep),
    "replace": lambda s, old, new: s.replace(old, new),
}


class RuleCompileError(ValueError):
    """A rule that does not parse: the real server rejects such a CRD."""


class EmulatorLimitation(RuntimeError):
    """A rule needs a Kubernetes CEL function this emulator does not provide."""


@dataclass(frozen=True)
class Rule:
    rule: str
    message: str
    message_expression: str
    reason: str  # FieldValueInvalid (default), FieldValueForbidden, FieldValueRequired, ...
    field_path: str
    optional_old_self: bool
    program: Any
    message_program: Any

    @property
    def is_transition(self) -> bool:
        """Rules that read ``oldSelf`` run only on updates with an old value to compare."""
        return "oldSelf" in self.program.variables()


def compile_rule(spec: Mapping[str, Any]) -> Rule:
    text = str(spec.get("rule", ""))
    try:
        program = cel.compile(text)
        msg_expr = str(spec.get("messageExpression", ""))
        message_program = cel.compile(msg_expr) if msg_expr else None
    except ValueError as e:
        raise RuleCompileError(f"compilation failed: {e}") from e
    return Rule(
        rule=text,
        message=str(spec.get("message", "")),
        message_expression=msg_expr,
        reason=str(spec.get("reason", "FieldValueInvalid")),
        field_path=str(spec.get("fieldPath", "")),
        optional_old_self=bool(spec.get("optionalOldSelf", False)),
        program=program,
        message_program=message_program,
    )


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""


def evaluate(
    rule: Rule, self_value: Any, old_value: Any = None, *, has_old: bool = False
) -> Verdict:
    variables: dict[str, Any] = {"self": self_value}
    if rule.is_transition:
        variables["oldSelf"] = old_value if has_old else None
    context = cel.Context(variables=variables, functions=dict(K8S_FUNCTIONS))
    try:
        result = rule.program.execute(context)
    except RuntimeError as e:
        if "Undefined variable or function" in str(e):  # self/oldSelf are always bound
            raise EmulatorLimitation(f"{e} (rule: {rule.rule})") from e
        return Verdict(False, f"{_first_line(e)} evaluating rule: {rule.rule}")
    except (KeyError, TypeError, ValueError) as e:
        what = f"no such key: {e.args[0]}" if isinstance(e, KeyError) else _first_line(e)
        return Verdict(False, f"{what} evaluating rule: {rule.rule}")
    if result is True:
        return Verdict(True)
    return Verdict(False, _message(rule, context))


def _message(rule: Rule, context: Any) -> str:
    if rule.message_program is not None:
        try:
            text = rule.message_program.execute(context)
            if isinstance(text, str) and text.strip():
                return text
        except (RuntimeError, KeyError, TypeError, ValueError):
            pass  # the server falls back to message / the default, as here
    return rule.message or f"failed rule: {rule.rule}"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__

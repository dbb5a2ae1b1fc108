"""Training methods, one module each behind the `Method` protocol (`methods/base.py`).

Adding a method is one module with its `Method` subclass and its spec, plus one entry here.
`METHODS` maps `method:` in a job spec to the class; `method_for(spec)` makes the instance.
"""

from __future__ import annotations

from types import MappingProxyType

from moeray.jobs.methods.base import Method, Plan, WorkerContext
from moeray.jobs.methods.dpo import Dpo
from moeray.jobs.methods.grpo import Grpo
from moeray.jobs.methods.pretrain import Pretrain
from moeray.jobs.methods.sft import Sft
from moeray.jobs.spec import JobSpec

METHODS = MappingProxyType({method.name: method for method in (Pretrain, Sft, Dpo, Grpo)})


def method_for(spec: JobSpec) -> Method:
    return METHODS[spec.method](spec)


__all__ = ["METHODS", "Method", "Plan", "WorkerContext", "method_for"]

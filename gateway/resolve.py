"""A request's `model` to one LocalModel.

A LocalModel answers to `namespace/name`, its `status.modelKey`, its name and each of its `spec.aliases`
(case-insensitive, as the model server matches keys). A name several LocalModels answer to picks none
(`namespace/name` says which), except that the models `visible` to the caller are preferred: a key that may
use only one of two same-named models gets that one. A `@variant` suffix (`org/model@q4_k_m`) is matched
without it, since the pod has loaded one variant only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .catalog import ServedModel


def names_of(model: ServedModel) -> set[str]:
    names = {model.id.lower(), model.name.lower(), *(alias.lower() for alias in model.aliases)}
    if model.model_key:
        names.add(model.model_key.lower())
    return names


def resolve(requested: str, models: Iterable[ServedModel],
            visible: Callable[[ServedModel], bool] = lambda _: True) -> list[ServedModel]:
    """The LocalModels `requested` names: one (found), none, or several (ambiguous, say namespace/name)."""
    wanted = requested.strip().lower()
    candidates = list(models)
    for name in (wanted, wanted.split("@", 1)[0]):
        if "/" in name:  # namespace/name is exact, whatever keys or aliases say
            exact = [m for m in candidates if m.id.lower() == name]
            if exact:
                return exact
        found = [m for m in candidates if name in names_of(m)]
        if len(found) > 1:
            found = [m for m in found if visible(m)] or found
        if found:
            return found
    return []


def upstream_model(requested: str, model: ServedModel) -> str:
    """What to put in the body's `model` for the pod: its key (a name or alias means nothing to the pod)."""
    if model.model_key is None:
        return requested
    base = requested.partition("@")[0]
    if base.lower() == model.model_key.lower():
        return requested  # already the key (with the client's @variant, if any)
    return model.model_key

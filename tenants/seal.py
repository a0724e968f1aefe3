"""The tenancy seal: the one way an org-scoped view (API or page) reaches tenant-owned rows.

Views narrow their organization's rows through one hook, `narrow_queryset`. Whatever the hook
returns must still be rows of the view's model filtered on the organization's own column, or the
request fails here, loudly, instead of serving another tenant's rows.
"""

from collections.abc import Callable, Iterable

from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet
from django.db.models.expressions import Col
from django.db.models.lookups import Exact
from django.db.models.sql.where import AND

from .models import Organization


class SealBroken(ImproperlyConfigured):
    """A view's code would reach rows outside its organization; a bug to fix, never a 4xx."""


def organization_rows(
    *, model: type, organization: Organization, narrow: Callable[[QuerySet], QuerySet]
) -> QuerySet:
    """The organization's rows of `model`, narrowed by `narrow`, with the filter proven kept."""
    narrowed = checked_rows(
        narrow(model.objects.for_organization(organization)),
        model=model,
        organization=organization,
        source=f"{model.__name__} narrowing ({getattr(narrow, '__qualname__', narrow)})",
    )
    # The check names the mistake; the filter applied again is what holds if some query shape
    # ever slips past it.
    return narrowed.filter(organization=organization)


def checked_rows(
    narrowed: object, *, model: type, organization: Organization, source: str
) -> QuerySet:
    """`narrowed` if it is still only `organization`'s rows of `model`; else SealBroken, whose
    message names `source` (the code that produced it) and how to mend it."""
    if not isinstance(narrowed, QuerySet) or narrowed.model is not model:
        raise SealBroken(
            f"The {source} returned {narrowed!r:.80}; it must return a queryset of "
            f"{model.__name__}, narrowed from the one it was given."
        )
    query = narrowed.query
    if query.combinator or query.is_sliced:
        raise SealBroken(
            f"The {source} returned a {query.combinator or 'sliced'} queryset; narrow with "
            "filters only (pagination slices later)."
        )
    if not query.is_empty() and not _filters_on(query, organization):
        raise SealBroken(
            f"The {source} dropped the organization filter; narrow the queryset it was given "
            "with filter()/exclude()/select_related(), or start from "
            f"{model.__name__}.objects.for_organization(organization)."
        )
    return narrowed


def _filters_on(query, organization: Organization) -> bool:
    """Whether every row the query can return has `organization_id = organization.pk`: an
    equality on the base table's own column among the top-level, non-negated AND conditions."""
    where = query.where
    if where.connector != AND or where.negated:
        return False
    return any(_is_organization_equality(c, query, organization) for c in where.children)


def _is_organization_equality(condition, query, organization: Organization) -> bool:
    if not isinstance(condition, Exact) or not isinstance(condition.lhs, Col):
        return False
    column = condition.lhs
    return (
        column.alias == query.base_table
        and column.target.name == "organization"
        and column.target.model is query.model
        and condition.rhs == organization.pk
    )


def sealed_overrides(cls: type, base: type, names: Iterable[str]) -> list[str]:
    """The names among `names` that `cls` no longer takes from `base`, by identity, so that an
    override arriving through a mixin is caught too."""
    return [name for name in names if getattr(cls, name) is not getattr(base, name)]


def refuse_unsealed(cls: type, base: type) -> None:
    """What every sealed base refuses in a subclass, at import: replacing a method the seal owns
    (`base._sealed`), or a class-level `queryset`, which would bypass the organization filter."""
    overridden = sealed_overrides(cls, base, base._sealed)
    if overridden:
        raise TypeError(
            f"{cls.__name__} overrides {', '.join(overridden)}, which the tenancy seal "
            "owns; narrow the organization's rows in narrow_queryset() instead."
        )
    if getattr(cls, "queryset", None) is not None:
        raise TypeError(
            f"{cls.__name__} sets `queryset`, which bypasses the organization filter; set "
            "`model` and narrow in narrow_queryset()."
        )

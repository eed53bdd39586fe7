"""Access control: a user's authorisations, then the record's access-control list."""

from __future__ import annotations

from collections.abc import Sequence

from bus.errors import Forbidden
from bus.models.common import AccessControlEntry, Right
from bus.models.users import Authorisation, UserAccount

#: Having the key right implies the value rights.
_IMPLIES: dict[Authorisation, set[Authorisation]] = {
    Authorisation.NETWORK_WRITE: {Authorisation.NETWORK_READ},
    Authorisation.APPLICATION_WRITE: {Authorisation.APPLICATION_READ},
}


def effective_authorisations(user: UserAccount) -> set[Authorisation]:
    """The user's authorisations with implied ones added."""
    out = set(user.authorisations)
    for a in user.authorisations:
        out |= _IMPLIES.get(a, set())
    return out


def principals_of(user: UserAccount) -> set[str]:
    """The ACL principals that match this user."""
    return {"*", f"user:{user.id}", *(f"group:{g}" for g in user.groups)}


def acl_allows(user: UserAccount, acl: Sequence[AccessControlEntry], right: Right) -> bool:
    """True if the ACL is empty (no record-level restriction) or grants ``right`` to the user."""
    if not acl:
        return True
    mine = principals_of(user)
    return any(entry.principal in mine and right in entry.rights for entry in acl)


def is_admin(user: UserAccount) -> bool:
    return Authorisation.ADMIN in user.authorisations and not user.disabled


def may_see(user: UserAccount, acl: Sequence[AccessControlEntry]) -> bool:
    """Whether a listing shows a record to this user (admins see everything)."""
    return is_admin(user) or (not user.disabled and acl_allows(user, acl, Right.READ))


def authorise(
    user: UserAccount,
    needed: Authorisation,
    *,
    acl: Sequence[AccessControlEntry] = (),
    right: Right = Right.READ,
    what: str = "",
) -> None:
    """Check a user may do something; admins pass every check.

    Raises:
        Forbidden: disabled user, missing authorisation, or the record's ACL refuses.
    """
    if user.disabled:
        raise Forbidden(f"user {user.id!r} is disabled")
    if is_admin(user):
        return
    if needed not in effective_authorisations(user):
        raise Forbidden(
            f"user {user.id!r} lacks the {needed.value} authorisation", details={"needed": needed.value, "on": what}
        )
    if not acl_allows(user, acl, right):
        raise Forbidden(
            f"access controls of {what or 'the record'} refuse {right.value} to {user.id!r}",
            details={"right": right.value, "on": what},
        )

"""Every UI URL, built in one place (templates call `urls.adapter(...)`, never format paths).

State lives in the URL (filters, sort, page), so a reload or a shared link shows the same view.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

PREFIX = "/ui"


def _query(params: dict[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list | tuple):
            pairs.extend((key, str(item)) for item in value)
        else:
            pairs.append((key, str(value)))
    return "?" + urlencode(pairs) if pairs else ""


def _part(text: str) -> str:
    return quote(text, safe="")


class Urls:
    """The UI's URLs. Adapter names are `ns/name`; numbers are version numbers."""

    home = f"{PREFIX}/"
    sign_in_page = f"{PREFIX}/sign-in"
    sign_out = f"{PREFIX}/sign-out"
    bases = f"{PREFIX}/bases"
    tokens = f"{PREFIX}/tokens"
    merge = f"{PREFIX}/merges"
    api_docs = "/docs"

    def static(self, name: str) -> str:
        return f"/static/{name}"

    def sign_in(self, next_url: str | None = None) -> str:
        return self.sign_in_page + _query({"next": next_url})

    def adapters(self, **filters: Any) -> str:
        return f"{PREFIX}/adapters" + _query(filters)

    def adapter(self, name: str, **params: Any) -> str:
        return f"{PREFIX}/adapters/{name}" + _query(params)

    def version(self, name: str, number: int) -> str:
        return f"{PREFIX}/adapters/{name}/versions/{number}"

    def alias(self, name: str, alias: str) -> str:
        return f"{PREFIX}/adapters/{name}/aliases/{_part(alias)}"

    def alias_delete(self, name: str, alias: str) -> str:
        return self.alias(name, alias) + "/delete"

    def yank(self, name: str, number: int) -> str:
        return self.version(name, number) + "/yank"

    def base(self, ref: str) -> str:
        return f"{PREFIX}/bases/{quote(ref, safe='/@')}"

    def jobs(self, **filters: Any) -> str:
        return f"{PREFIX}/jobs" + _query(filters)

    def job(self, job_id: str) -> str:
        return f"{PREFIX}/jobs/{_part(job_id)}"

    def job_status(self, job_id: str) -> str:
        return self.job(job_id) + "/status"

    def job_cancel(self, job_id: str) -> str:
        return self.job(job_id) + "/cancel"

    def audit(self, **filters: Any) -> str:
        return f"{PREFIX}/audit" + _query(filters)

    def token_revoke(self, name: str) -> str:
        return f"{PREFIX}/tokens/{_part(name)}/revoke"

    def event_subject(self, action: str, subject: str, details: dict[str, Any]) -> str | None:
        """The page of an audit event's subject (a version, an adapter, a job, a base, the
        tokens), None when it has none (e.g. gc)."""
        family = action.partition(".")[0]
        if family == "token":
            return self.tokens
        if family == "base":
            return self.base(subject)
        if family == "merge" and details.get("job"):
            return self.job(str(details["job"]))
        name, _, selector = subject.partition("@")
        if name.count("/") != 1 or not all(name.split("/")):
            return None
        if selector.isdigit():
            return self.version(name, int(selector))
        return self.adapter(name)


urls = Urls()

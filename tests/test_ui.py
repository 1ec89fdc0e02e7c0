"""The web UI without a browser: every page answers on an empty and on a seeded registry, links
and forms stay on this server, sign-in, CSRF and permissions follow the API's rules, errors are
pages under /ui/ and problem+json under /api/, and the pure helpers (registry/ui/views.py,
registry/ui/urls.py) compute what the pages draw and link. tests/test_ui_browser.py drives the
same pages in Chromium.

Servers are real (`lora-reg server` subprocesses) and started once per module: one with auth off
per backend (its empty pages are fetched before it is seeded) and one with auth on (SQLite +
folder store; the rules are the same on every backend). Tests that change anything push an
adapter of their own, so they can run in any order.
"""

from __future__ import annotations

import html
import http.client
import math
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from cli.client import Registry
from registry.app import create_app
from registry.auth import route_rules
from registry.core.schemas import AliasMoveOut, VersionOut
from registry.settings import Settings
from registry.ui import views
from registry.ui.api import ASSETS
from registry.ui.pages import TIMELINE_SPANS
from registry.ui.urls import urls
from tests.conftest import BACKENDS, RunningServer, own_server, unique, unique_name

BASE = "org/tiny"
LINEAGE_URL = "https://example.com/runs/42"
FRAGMENTS = {"/ui/jobs/{job_id}/status"}  # pieces a page's script swaps in, not whole pages
CRAWL_LIMIT = 300  # pages and assets a crawl fetches at most


# --- reading pages -------------------------------------------------------------------------------


@dataclass
class Link:
    tag: str
    url: str
    rel: str


@dataclass
class Form:
    method: str
    action: str | None
    fields: dict[str, str] = field(default_factory=dict)


class Parts(HTMLParser):
    """The links, resources, forms and visible text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[Link] = []
        self.forms: list[Form] = []
        self._form: Form | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {key: value or "" for key, value in attrs}
        for attr in ("href", "src"):
            if attr in found:
                self.links.append(Link(tag, found[attr], found.get("rel", "")))
        if tag == "form":
            self._form = Form(found.get("method", "get").lower(), found.get("action"))
        elif tag in ("input", "select", "textarea") and self._form is not None and "name" in found:
            self._form.fields[found["name"]] = found.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._form is not None:
            self.forms.append(self._form)
            self._form = None

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self._text).split())


def parts(response: httpx.Response) -> Parts:
    parser = Parts()
    parser.feed(response.text)
    parser.close()
    return parser


def is_page(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/html") and (
        response.text.lstrip().lower().startswith("<!doctype html>")
    )


def set_cookie(response: httpx.Response, name: str) -> dict[str, str] | None:
    """The attributes of the Set-Cookie header for `name` (lower-case keys; the value under
    `value`), None when the response sets no such cookie."""
    for header in response.headers.get_list("set-cookie"):
        first, *attributes = (part.strip() for part in header.split(";"))
        key, _, value = first.partition("=")
        if key == name:
            found = {"value": value}
            for attribute in attributes:
                attr, _, attr_value = attribute.partition("=")
                found[attr.lower()] = attr_value
            return found
    return None


class Browser:
    """An httpx client that keeps cookies like a browser and sends forms with the CSRF token
    the pages carry. Redirects are not followed: tests look at them."""

    def __init__(self, url: str) -> None:
        self.seen: list[str] = []  # every URL requested and every Location answered
        self.http = httpx.Client(
            base_url=url,
            timeout=30,
            event_hooks={"request": [self._request], "response": [self._response]},
        )

    def _request(self, request: httpx.Request) -> None:
        self.seen.append(str(request.url))

    def _response(self, response: httpx.Response) -> None:
        self.seen.extend(response.headers.get_list("location"))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    @property
    def csrf(self) -> str:
        token = self.http.cookies.get("lr_csrf")
        if token is None:  # the first page seen sets it (with auth off: the adapters page)
            self.get(urls.sign_in_page, follow_redirects=True)
            token = self.http.cookies.get("lr_csrf")
        assert token, "no lr_csrf cookie after a UI page"
        return token

    def post(self, path: str, csrf: str | None = "cookie", **fields: str) -> httpx.Response:
        """POST a form; `csrf` is the page's token ("cookie"), another value, or None to leave
        the field out."""
        body = dict(fields)
        if csrf == "cookie":
            body["csrf"] = self.csrf
        elif csrf is not None:
            body["csrf"] = csrf
        return self.http.post(path, data=body)

    def sign_in(self, secret: str, next_url: str | None = None) -> httpx.Response:
        return self.post(urls.sign_in_page, token=secret, next=next_url or "")

    def close(self) -> None:
        self.http.close()


# --- the routes under test -----------------------------------------------------------------------


def ui_get_routes() -> list[str]:
    """Every GET route of the UI, from the app's own route table (so new pages are included)."""
    app = create_app(
        Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x", auth=False)
    )
    routes = sorted(
        {rule.path for rule in route_rules(app) if rule.method == "GET"}
        & {rule.path for rule in route_rules(app) if rule.path.startswith(urls.home)}
    )
    assert len(routes) >= 10, routes
    return routes


UI_GET_ROUTES = ui_get_routes()
NOTHING = {
    "namespace": "nobody",
    "name": "nothing",
    "number": "1",
    "ref:path": "nobody/nothing",
    "job_id": "0" * 32,
}


def concrete(route: str, values: dict[str, str]) -> str:
    """A route's path with its parameters filled in (KeyError: a new parameter needs a value)."""
    return re.sub(r"\{([\w:]+)\}", lambda m: values[m.group(1)], route)


def has_parameters(route: str) -> bool:
    return "{" in route


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Seeded:
    """A server with auth off, seeded with real adapters (see `seed`), and what its pages said
    while it was still empty."""

    server: RunningServer
    empty: dict[str, httpx.Response]  # route -> its answer before anything was pushed
    values: dict[str, str]  # path parameters that name seeded things
    name: str  # ns/name: 3 versions with metrics, aliases moved, v1 yanked
    other: str  # ns/name: 1 version, no registered base
    job: str


def seed(
    client: Registry, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> dict[str, str]:
    """A registered base, an adapter with three versions (metrics, labels, lineage, aliases moved
    back and forth, v1 yanked), another without a base, and a queued merge job."""
    client.add_base(BASE, base_dir("llama"))
    name = unique_name()
    for seed_, rouge in ((0, 0.41), (1, 0.47), (2, 0.44)):
        client.push(
            adapter_dir("llama", seed=seed_),
            name,
            base=BASE,
            metrics={"rougeL": rouge, "bleu": 0.2 + seed_ / 100},
            labels={"task": "summarize"},
            lineage={"run": LINEAGE_URL, "dataset": "cnn_dailymail"},
            description=f"seed {seed_}",
        )
    client.set_alias(f"{name}@1", "staging")
    client.set_alias(f"{name}@2", "staging")
    client.set_alias(f"{name}@2", "production")
    client.set_alias(f"{name}@3", "canary")
    client.remove_alias(name, "canary")
    client.yank(f"{name}@1", "regressed on rougeL")
    other = f"{unique('team')}/translator"
    client.push(adapter_dir("llama", seed=3), other, metrics={"bleu": 0.3})
    job = client.request_merge(f"{name}@2").id
    return {"name": name, "other": other, "job": job}


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> Iterator[Seeded]:
    workdir = tmp_path_factory.mktemp(f"ui-{request.param}")
    with own_server(request, workdir / "server", request.param) as server:
        # A connection each: uvicorn closes a kept-alive one after a 500, failing the next.
        empty = {
            route: httpx.get(server.url + concrete(route, NOTHING), follow_redirects=True)
            for route in UI_GET_ROUTES
        }
        client = server.client(workdir / "cache")
        try:
            made = seed(client, adapter_dir, base_dir)
        finally:
            client.close()
        namespace, name = made["name"].split("/")
        values = {
            "namespace": namespace,
            "name": name,
            "number": "2",
            "ref:path": BASE,
            "job_id": made["job"],
        }
        yield Seeded(server, empty, values, made["name"], made["other"], made["job"])


@dataclass
class Secured:
    """A server with auth on, and a secret per scope (admin: the bootstrap token)."""

    server: RunningServer
    secrets: dict[str, str]
    names: dict[str, str]  # scope -> the token's name
    push: Callable[[int], str]  # a fresh adapter with N versions, pushed by the admin

    def api(self, scope: str = "admin") -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.secrets[scope]}"},
            timeout=30,
        )

    def browser(self, scope: str | None = None) -> Browser:
        """A browser signed in with the token of `scope` (None: signed out)."""
        browser = Browser(self.server.url)
        if scope is not None:
            signed = browser.sign_in(self.secrets[scope])
            assert signed.status_code == 303, signed.text
        return browser


@pytest.fixture(scope="module")
def secured(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Callable[..., Path],
) -> Iterator[Secured]:
    workdir = tmp_path_factory.mktemp("ui-auth")
    with own_server(request, workdir / "server", LORA_REG_AUTH="on") as server:
        assert server.token is not None
        secrets = {"admin": server.token}
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}
        ) as admin:
            names = {"admin": admin.get("/api/v1/whoami").json()["name"]}
            for scope in ("read", "write"):
                names[scope] = f"ui-{scope}"
                created = admin.post("/api/v1/tokens", json={"name": names[scope], "scope": scope})
                assert created.status_code == 201, created.text
                secrets[scope] = created.json()["token"]
        client = server.client(workdir / "cache")

        def push(count: int) -> str:
            name = unique_name()
            for number in range(count):
                client.push(adapter_dir("llama", seed=number), name, metrics={"rougeL": 0.4})
            return name

        try:
            yield Secured(server, secrets, names, push)
        finally:
            client.close()


@pytest.fixture
def browse(seeded: Seeded) -> Iterator[Browser]:
    browser = Browser(seeded.server.url)
    yield browser
    browser.close()


# --- every page, empty and seeded ----------------------------------------------------------------


@pytest.mark.parametrize("route", UI_GET_ROUTES)
def test_every_page_answers_on_an_empty_registry(seeded: Seeded, route: str) -> None:
    """Pages that exist without data show their empty state; pages of a thing that does not
    exist are 404 pages (HTML, not JSON)."""
    response = seeded.empty[route]
    assert response.headers["content-type"].startswith("text/html"), response.text
    if has_parameters(route):
        assert response.status_code == 404, response.text
        assert is_page(response) and "not_found" in parts(response).text
    else:
        assert response.status_code == 200, response.text
        assert route in FRAGMENTS or is_page(response)


def test_empty_pages_say_what_to_do_next(seeded: Seeded) -> None:
    assert "No adapters yet" in parts(seeded.empty["/ui/adapters"]).text
    assert "lora-reg push" in parts(seeded.empty["/ui/adapters"]).text
    assert "lora-reg base add" in parts(seeded.empty["/ui/bases"]).text
    assert "No merge jobs" in parts(seeded.empty["/ui/jobs"]).text
    assert "Nothing has happened yet" in parts(seeded.empty["/ui/audit"]).text


@pytest.mark.parametrize("route", UI_GET_ROUTES)
def test_every_page_answers_on_a_seeded_registry(
    seeded: Seeded, browse: Browser, route: str
) -> None:
    response = browse.get(concrete(route, seeded.values), follow_redirects=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert urlsplit(str(response.url)).netloc == urlsplit(seeded.server.url).netloc
    assert route in FRAGMENTS or is_page(response)


def test_the_adapter_page_shows_metrics_chart_aliases_and_timeline(
    seeded: Seeded, browse: Browser
) -> None:
    page = browse.get(urls.adapter(seeded.name))
    text = parts(page).text
    assert page.status_code == 200
    # One sortable column per metric, one chart per metric with one point per version.
    for metric in ("bleu", "rougeL"):
        assert (
            f'href="{html.escape(urls.adapter(seeded.name, sort="-metrics." + metric))}"'
            in page.text
        )
        chart = re.search(rf'<svg[^>]*data-metric="{metric}"[^>]*>(.*?)</svg>', page.text, re.S)
        assert chart is not None, metric
        assert sorted(re.findall(r'data-version="(\d+)"', chart.group(1))) == ["1", "2", "3"]
    assert "best v2 (0.47)" in text
    # v1 is yanked: struck through in the versions table.
    assert "<s>v1</s>" in page.text
    # The timeline: staging meant v1, then v2; canary was set and removed.
    staging = re.search(r'data-alias="staging".*?</table>', page.text, re.S)
    assert staging is not None
    assert re.findall(r">v(\d)</a>", staging.group(0)) == ["2", "1"]
    canary = re.search(r'data-alias="canary".*?</table>', page.text, re.S)
    assert canary is not None and "removed" in canary.group(0)


def test_the_timeline_shows_an_aliases_newest_moves_and_links_the_audit_log_for_the_rest(
    seeded: Seeded, browse: Browser
) -> None:
    adapter = urls.adapter(seeded.name)
    for move in range(TIMELINE_SPANS + 2):  # v2, v3, v2, ... (v1 is yanked)
        moved = browse.post(adapter + "/aliases", alias="nightly", version=str(2 + move % 2))
        assert moved.status_code == 303, moved.text
    try:
        page = browse.get(adapter).text
        nightly = re.search(r'data-alias="nightly".*?</table>(.*?)(?:<h3|</section>)', page, re.S)
        assert nightly is not None
        assert nightly.group(0).count("<tr>") == 1 + TIMELINE_SPANS  # the header, the newest
        audit = urls.audit(subject=f"{seeded.name}@nightly")
        assert f'href="{html.escape(audit)}"' in nightly.group(1)
        logged = parts(browse.get(audit)).text
        assert logged.count("alias.set") == TIMELINE_SPANS + 2
        # Fewer moves than that: all of them, and no link.
        staging = re.search(r'data-alias="staging".*?</table>(.*?)(?:<h3|</section>)', page, re.S)
        assert staging is not None and "audit" not in staging.group(1)
    finally:
        browse.post(urls.alias_delete(seeded.name, "nightly"))


def test_the_version_page_shows_config_lineage_compatibility_and_pull(
    seeded: Seeded, browse: Browser
) -> None:
    page = browse.get(urls.version(seeded.name, 2))
    text = parts(page).text
    assert f"lora-reg pull {seeded.name}@2" in page.text
    assert "production" in text and "cnn_dailymail" in text and "task" in text
    assert f'<a href="{LINEAGE_URL}" rel="noopener noreferrer">' in page.text
    assert "compatible against" in text and BASE in text
    assert "adapter_model.safetensors" in text and "adapter_config.json" in text
    assert urls.job(seeded.job) in page.text  # the merge requested from it
    yanked = parts(browse.get(urls.version(seeded.name, 1))).text
    assert "Yanked" in yanked and "regressed on rougeL" in yanked


def test_adapters_filter_by_search_namespace_base_and_label(
    seeded: Seeded, browse: Browser
) -> None:
    def listed(**filters: Any) -> set[str]:
        page = browse.get(urls.adapters(**filters))
        assert page.status_code == 200, page.text
        return {
            link.url.removeprefix(urls.adapters() + "/")
            for link in parts(page).links
            if link.url.startswith(urls.adapters() + "/") and "/versions/" not in link.url
        }

    namespace = seeded.other.split("/")[0]
    assert listed() >= {seeded.name, seeded.other}
    assert listed(q="translator") >= {seeded.other}
    assert seeded.name not in listed(q="translator")
    assert listed(namespace=namespace) == {seeded.other}
    assert seeded.name in listed(base=BASE) and seeded.other not in listed(base=BASE)
    assert seeded.name in listed(label="task=summarize")
    assert seeded.other not in listed(label="task=summarize")
    assert "No adapter matches" in parts(browse.get(urls.adapters(q="zzz-nothing"))).text


# --- links and forms -----------------------------------------------------------------------------


@dataclass
class Crawl:
    fetched: int
    linked: set[str]  # same-origin paths (with their query) some page links to
    forms: int  # <form>s seen on the pages


def crawl(browser: Browser, starts: list[str], outside: set[str]) -> Crawl:
    """Fetch the `starts` and, breadth first, every same-origin link of every page (at most
    CRAWL_LIMIT fetches): each must answer 200 (after redirects); a link elsewhere must be one
    of `outside` (lineage URLs people pushed), opened without a referrer; every form must post
    to this server, POST forms with the page's CSRF token (GET filter forms carry none)."""
    origin = urlsplit(str(browser.http.base_url)).netloc
    queue = [path for path in starts]
    seen = set(queue)
    found = Crawl(0, set(), 0)
    while queue and found.fetched < CRAWL_LIMIT:
        url = queue.pop(0)
        response = browser.get(url, follow_redirects=True)
        found.fetched += 1
        assert response.status_code == 200, (url, response.status_code, response.text[:500])
        if not response.headers.get("content-type", "").startswith("text/html"):
            continue
        page = parts(response)
        for link in page.links:
            target = urljoin(str(response.url), link.url).partition("#")[0]
            where = urlsplit(target)
            if where.netloc != origin:
                assert link.tag == "a" and link.url in outside, (url, link)
                assert "noreferrer" in link.rel.split(), (url, link)
                continue
            assert where.scheme == "http", (url, link)
            path = where.path + (f"?{where.query}" if where.query else "")
            found.linked.add(path)
            if path not in seen:
                seen.add(path)
                queue.append(path)
        for form in page.forms:
            found.forms += 1
            action = form.action or ""
            assert action.startswith("/") and not action.startswith("//"), (url, form)
            if form.method == "post":
                assert form.fields.get("csrf") == browser.csrf, (url, form)
            else:
                assert form.method == "get" and "csrf" not in form.fields, (url, form)
    return found


def test_a_crawl_finds_no_error_and_no_other_origin(seeded: Seeded, browse: Browser) -> None:
    """From the adapters page and every UI route, following every link."""
    starts = [urls.adapters()] + [concrete(route, seeded.values) for route in UI_GET_ROUTES]
    found = crawl(browse, starts, {LINEAGE_URL})
    assert found.fetched >= 40 and found.forms >= 10, found
    # Pages link to each other: from the adapters list down to a version, its base and job.
    for must in (
        urls.adapter(seeded.name),
        urls.version(seeded.name, 2),
        urls.base(BASE),
        urls.job(seeded.job),
        urls.adapter(seeded.name, sort="-metrics.rougeL"),
        urls.audit(action="alias.set"),
    ):
        assert must in found.linked, must


def test_a_signed_in_crawl_finds_no_error_and_protects_every_form(secured: Secured) -> None:
    """With auth on, as an admin: the token pages and the sign-out form are crawled too."""
    name = secured.push(2)
    browser = secured.browser("admin")
    try:
        found = crawl(browser, [urls.adapters(), urls.adapter(name), urls.tokens], set())
        assert urls.tokens in found.linked and urls.version(name, 2) in found.linked
        assert found.forms >= 10, found
    finally:
        browser.close()


def test_forms_move_and_remove_an_alias(seeded: Seeded, browse: Browser) -> None:
    """Auth off: the forms act (as the anonymous admin) and the REST API sees the result."""
    moved = browse.post(urls.adapter(seeded.other) + "/aliases", alias="staging", version="1")
    assert moved.status_code == 303, moved.text
    assert moved.headers["location"] == urls.adapter(seeded.other) + "#aliases"
    aliases = f"/api/v1/adapters/{seeded.other}/aliases"
    assert [a["alias"] for a in browse.get(aliases).json()] == ["staging"]
    removed = browse.post(urls.alias_delete(seeded.other, "staging"))
    assert removed.status_code == 303, removed.text
    assert browse.get(aliases).json() == []
    history = browse.get(f"/api/v1/adapters/{seeded.other}/history").json()["items"]
    assert [(m["alias"], m["version"]) for m in history][:2] == [("staging", None), ("staging", 1)]


def test_forms_request_a_merge_and_cancel_it(seeded: Seeded, browse: Browser) -> None:
    requested = browse.post(urls.merge, adapter=f"{seeded.name}@3", base=BASE, target="registry")
    assert requested.status_code == 303, requested.text
    job = requested.headers["location"].removeprefix(urls.job(""))
    assert requested.headers["location"] == urls.job(job)
    page = browse.get(urls.job(job))
    assert "queued" in parts(page).text and f'data-refresh="{urls.job_status(job)}"' in page.text
    assert urls.job_cancel(job) in page.text
    cancelled = browse.post(urls.job_cancel(job))
    assert cancelled.status_code == 303 and cancelled.headers["location"] == urls.job(job)
    assert browse.get(f"/api/v1/merges/{job}").json()["status"] == "cancelled"
    finished = browse.get(urls.job(job))
    assert "data-refresh" not in finished.text and urls.job_cancel(job) not in finished.text
    yanked = browse.post(urls.merge, adapter=f"{seeded.name}@1", base=BASE)
    assert yanked.status_code == 409 and "version_yanked" in parts(yanked).text


# --- signing in ----------------------------------------------------------------------------------


def test_signed_out_visitors_are_sent_to_sign_in_from_every_page(secured: Secured) -> None:
    browser = secured.browser()
    name = secured.push(1)
    namespace, short = name.split("/")
    values = {**NOTHING, "namespace": namespace, "name": short}
    try:
        for route in UI_GET_ROUTES:
            path = concrete(route, values)
            response = browser.get(path + "?offset=0")
            if route == urls.sign_in_page:
                assert response.status_code == 200 and is_page(response)
                continue
            assert response.status_code == 303, (route, response.text)
            location = urlsplit(response.headers["location"])
            assert location.path == urls.sign_in_page, route
            assert parse_qs(location.query)["next"] == [path + "?offset=0"], route
            assert set_cookie(response, "lr_token") is None
        # Outside the UI: the root, the assets and the API docs are anyone's.
        assert browser.get("/").headers["location"] == urls.home
        assert browser.get(urls.static("ui.css")).status_code == 200
        assert browser.get("/docs").status_code == 200
    finally:
        browser.close()


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("lrt_" + "A" * 43, "unknown token"),
        ("not-a-token", "paste a registry token: it starts with lrt_"),
        ("", "paste a registry token: it starts with lrt_"),
    ],
)
def test_sign_in_with_a_bad_token_says_why(secured: Secured, token: str, message: str) -> None:
    browser = secured.browser()
    try:
        refused = browser.sign_in(token, urls.audit())
        assert refused.status_code == 401, refused.text
        assert is_page(refused) and message in parts(refused).text
        assert set_cookie(refused, "lr_token") is None
        assert browser.get(urls.audit()).status_code == 303  # still signed out
    finally:
        browser.close()


def test_sign_in_keeps_the_token_in_a_strict_http_only_cookie(secured: Secured) -> None:
    browser = secured.browser()
    try:
        signed = browser.sign_in(secured.secrets["write"], urls.audit(actor="someone"))
        assert signed.status_code == 303, signed.text
        assert signed.headers["location"] == urls.audit(actor="someone")
        cookie = set_cookie(signed, "lr_token")
        assert cookie is not None
        assert cookie["value"] == secured.secrets["write"]
        assert "httponly" in cookie and cookie["samesite"].lower() == "strict"
        assert cookie["path"] == "/ui/"
        assert "secure" not in cookie  # served over plain http here
        page = browser.get(urls.audit(actor="someone"))
        assert page.status_code == 200 and secured.names["write"] in parts(page).text
        # After signing in, only a page of this UI: never another site.
        for elsewhere in ("https://evil.example/", "//evil.example/ui/", "/api/v1/tokens"):
            again = browser.sign_in(secured.secrets["write"], elsewhere)
            assert again.headers["location"] == urls.home, elsewhere
    finally:
        browser.close()


def test_the_cookie_is_secure_when_the_page_came_over_https(secured: Secured) -> None:
    """Behind a TLS proxy on this host (uvicorn trusts X-Forwarded-Proto from loopback)."""
    browser = secured.browser()
    try:
        browser.get(urls.sign_in_page)
        signed = browser.http.post(
            urls.sign_in_page,
            data={"csrf": browser.csrf, "token": secured.secrets["read"], "next": ""},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert signed.status_code == 303, signed.text
        cookie = set_cookie(signed, "lr_token")
        assert cookie is not None and "secure" in cookie
    finally:
        browser.close()


def test_a_token_never_appears_in_a_url_or_the_server_log(secured: Secured) -> None:
    browser = secured.browser("admin")
    name = secured.push(1)
    try:
        made = browser.post(urls.tokens, name=unique("t"), scope="read")
        assert made.status_code == 201, made.text
        secret = re.search(r"lrt_[A-Za-z0-9_-]{43}", made.text)
        assert secret is not None
        for path in (urls.adapters(), urls.adapter(name), urls.version(name, 1), urls.tokens):
            assert browser.get(path).status_code == 200
        browser.post(urls.sign_out)
        browser.sign_in(secret.group(0), urls.adapter(name))
        browser.get(urls.adapter(name))
        secrets = [secured.secrets["admin"], secret.group(0)]
        assert browser.seen, "the browser recorded nothing"
        for url in browser.seen:
            assert not any(s in url for s in secrets), url
            assert "lrt_" not in url, url
        logs = "".join(p.read_text(errors="replace") for p in secured.server.workdir.glob("*.log"))
        assert secret.group(0) not in logs
    finally:
        browser.close()


def test_forms_without_the_right_csrf_token_are_refused_and_change_nothing(
    secured: Secured,
) -> None:
    browser = secured.browser("admin")
    name = secured.push(2)
    path = urls.adapter(name) + "/aliases"
    try:
        # One character off (a token ends in "A" one time in 16: then another letter).
        off = browser.csrf[:-1] + ("E" if browser.csrf.endswith("A") else "A")
        for csrf in (None, "", "x" * 43, off):
            refused = browser.post(path, csrf=csrf, alias="staging", version="2")
            assert refused.status_code == 403, (csrf, refused.text)
            assert is_page(refused) and "not_permitted" in parts(refused).text
            assert "CSRF" in parts(refused).text
        # A browser that never got the cookie (another site's page posting here) is refused too.
        with httpx.Client(base_url=secured.server.url) as stranger:
            forged = stranger.post(
                path,
                data={"csrf": browser.csrf, "alias": "staging", "version": "2"},
                headers={"Cookie": f"lr_token={secured.secrets['admin']}"},
            )
        assert forged.status_code == 403, forged.text
        with secured.api() as api:
            assert api.get(f"/api/v1/adapters/{name}/aliases").json() == []
            assert api.get(f"/api/v1/adapters/{name}/history").json()["items"] == []
        # Signing in and out are forms too.
        assert browser.post(urls.sign_out, csrf=None, go="1").status_code == 403
        assert browser.get(urls.adapters()).status_code == 200  # still signed in
        signed_out = secured.browser()
        try:
            sign_in = signed_out.post(
                urls.sign_in_page, csrf="x" * 43, token=secured.secrets["read"]
            )
            assert sign_in.status_code == 403 and set_cookie(sign_in, "lr_token") is None
        finally:
            signed_out.close()
    finally:
        browser.close()


def test_sign_out_clears_the_cookie(secured: Secured) -> None:
    browser = secured.browser("read")
    try:
        assert browser.get(urls.adapters()).status_code == 200
        out = browser.post(urls.sign_out)
        assert (
            out.status_code == 303 and urlsplit(out.headers["location"]).path == urls.sign_in_page
        )
        cookie = set_cookie(out, "lr_token")
        assert cookie is not None and cookie["value"] in ("", '""')
        assert cookie.get("max-age") == "0" and cookie["path"] == "/ui/"
        assert browser.http.cookies.get("lr_token") is None
        assert browser.get(urls.adapters()).status_code == 303
    finally:
        browser.close()


def test_a_revoked_tokens_cookie_goes_back_to_sign_in(secured: Secured) -> None:
    token = unique("t")
    with secured.api() as api:
        secret = api.post("/api/v1/tokens", json={"name": token, "scope": "read"}).json()["token"]
        browser = Browser(secured.server.url)
        try:
            assert browser.sign_in(secret).status_code == 303
            assert browser.get(urls.adapters()).status_code == 200
            assert api.delete(f"/api/v1/tokens/{token}").status_code == 200
            back = browser.get(urls.adapters())
            assert back.status_code == 303
            assert urlsplit(back.headers["location"]).path == urls.sign_in_page
            cleared = set_cookie(back, "lr_token")
            assert cleared is not None and cleared.get("max-age") == "0"
        finally:
            browser.close()


# --- permissions through the UI ------------------------------------------------------------------


def aliases_of(secured: Secured, name: str) -> dict[str, int]:
    with secured.api("read") as api:
        items = api.get(f"/api/v1/adapters/{name}/aliases").json()
    return {item["alias"]: item["version"] for item in items}


def test_a_read_token_cannot_move_an_alias(secured: Secured) -> None:
    name = secured.push(1)
    browser = secured.browser("read")
    try:
        page = browser.get(urls.adapter(name))
        assert not [
            form for form in parts(page).forms if form.method == "post" and "alias" in form.fields
        ]
        refused = browser.post(urls.adapter(name) + "/aliases", alias="staging", version="1")
        assert refused.status_code == 403, refused.text
        text = parts(refused).text
        assert "not_permitted" in text and "scope read" in text
        assert aliases_of(secured, name) == {}
    finally:
        browser.close()


def cli_message(result: subprocess.CompletedProcess[str]) -> str:
    """The message of `lora-reg`'s `error (code): message` line, whitespace joined."""
    text = " ".join(result.stderr.split())
    match = re.search(r"error \((\w+)\): (.*)$", text)
    assert match, result.stderr
    return match.group(2)


def test_a_write_token_gets_the_clis_message_on_a_protected_alias(secured: Secured) -> None:
    name = secured.push(1)
    cli = secured.server.cli(
        "alias", "set", f"{name}@1", "production",
        env={"LORA_REG_TOKEN": secured.secrets["write"], "COLUMNS": "500"},
    )  # fmt: skip
    assert cli.returncode == 4, cli.stderr
    browser = secured.browser("write")
    try:
        refused = browser.post(urls.adapter(name) + "/aliases", alias="production", version="1")
        assert refused.status_code == 409, refused.text
        text = parts(refused).text
        assert "protected_alias" in text
        assert cli_message(cli) in text
        assert aliases_of(secured, name) == {}
        staging = browser.post(urls.adapter(name) + "/aliases", alias="staging", version="1")
        assert staging.status_code == 303, staging.text
        assert aliases_of(secured, name) == {"staging": 1}
    finally:
        browser.close()


def test_an_admin_moves_production_and_history_and_audit_show_who(secured: Secured) -> None:
    name = secured.push(2)
    admin = secured.names["admin"]
    browser = secured.browser("admin")
    try:
        moved = browser.post(urls.adapter(name) + "/aliases", alias="production", version="2")
        assert moved.status_code == 303, moved.text
        assert aliases_of(secured, name) == {"production": 2}
        with secured.api("read") as api:
            history = api.get(f"/api/v1/adapters/{name}/history").json()["items"]
            audit = api.get("/api/v1/audit", params={"subject": f"{name}@production"}).json()
        assert [(m["alias"], m["version"], m["actor"]) for m in history] == [
            ("production", 2, admin)
        ]
        assert [(e["action"], e["actor"]) for e in audit["items"]] == [("alias.set", admin)]
        timeline = browser.get(urls.adapter(name)).text
        production = re.search(r'data-alias="production".*?</table>', timeline, re.S)
        assert production is not None and ">v2</a>" in production.group(0)
        assert admin in production.group(0)
        shown = browser.get(urls.audit(action="alias.set", subject=f"{name}@production"))
        assert f'href="{urls.adapter(name)}"' in shown.text and admin in parts(shown).text
    finally:
        browser.close()


def test_yank_through_the_form(secured: Secured) -> None:
    name = secured.push(2)
    browser = secured.browser("write")
    try:
        missing = browser.post(urls.yank(name, 2), reason="  ")
        assert missing.status_code == 422 and "a reason" in parts(missing).text
        yanked = browser.post(urls.yank(name, 2), reason="regressed on rougeL")
        assert yanked.status_code == 303 and yanked.headers["location"] == urls.version(name, 2)
        with secured.api("read") as api:
            version = api.get(f"/api/v1/adapters/{name}/versions/2").json()
        assert version["yanked_at"] and version["yank_reason"] == "regressed on rougeL"
        assert version["yanked_by"] == secured.names["write"]
        page = browser.get(urls.version(name, 2))
        assert "Yanked" in parts(page).text
        assert urls.yank(name, 2) not in page.text  # no second yank form
    finally:
        browser.close()
    reader = secured.browser("read")
    try:
        assert reader.post(urls.yank(name, 1), reason="no").status_code == 403
    finally:
        reader.close()


def test_tokens_are_created_with_the_secret_shown_once_and_revoked(secured: Secured) -> None:
    token = unique("ci")
    browser = secured.browser("admin")
    try:
        made = browser.post(urls.tokens, name=token, scope="read")
        assert made.status_code == 201, made.text
        assert made.headers["cache-control"] == "no-store"
        secret = re.search(r'value="(lrt_[A-Za-z0-9_-]{43})"', made.text)
        assert secret is not None
        with httpx.Client(
            base_url=secured.server.url, headers={"Authorization": f"Bearer {secret.group(1)}"}
        ) as holder:
            assert holder.get("/api/v1/whoami").json()["name"] == token
            again = browser.get(urls.tokens)
            assert token in parts(again).text and secret.group(1) not in again.text
            revoked = browser.post(urls.token_revoke(token))
            assert revoked.status_code == 303 and revoked.headers["location"] == urls.tokens
            assert holder.get("/api/v1/whoami").status_code == 401
    finally:
        browser.close()
    writer = secured.browser("write")
    try:
        assert writer.get(urls.tokens).status_code == 403
        assert writer.post(urls.tokens, name=unique("x"), scope="admin").status_code == 403
    finally:
        writer.close()


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ui", "api", "status", "code"),
    [
        ("/ui/nothing-here", "/api/v1/nothing-here", 404, "not_found"),
        ("/ui/audit?since=bad", "/api/v1/audit?since=bad", 422, "invalid_input"),
        ("/ui/adapters?offset=-1", "/api/v1/adapters?offset=-1", 422, "invalid_input"),
        ("/ui/adapters/Bad_Name/x", "/api/v1/adapters/Bad_Name/x", 422, "invalid_name"),
        (
            "/ui/adapters/nobody/nothing/versions/1",
            "/api/v1/adapters/nobody/nothing/versions/1",
            404,
            "adapter_not_found",
        ),
        ("/ui/jobs/" + "0" * 32, "/api/v1/merges/" + "0" * 32, 404, "job_not_found"),
    ],
)
def test_errors_are_pages_under_ui_and_problem_json_under_api(
    seeded: Seeded, browse: Browser, ui: str, api: str, status: int, code: str
) -> None:
    page = browse.get(ui)
    assert page.status_code == status, page.text
    assert is_page(page), page.text
    assert f"{code}:" in parts(page).text
    problem = browse.get(api)
    assert problem.status_code == status, problem.text
    assert problem.headers["content-type"].startswith("application/problem+json")
    assert problem.json()["code"] == code
    if code != "not_found":  # an unknown page and an unknown API route are different things
        # The page gives the API's (and so the CLI's) message, word for word.
        assert " ".join(problem.json()["detail"].split()) in parts(page).text


# --- headers, assets, docs -----------------------------------------------------------------------


def test_pages_carry_the_security_headers(seeded: Seeded, browse: Browser) -> None:
    paths = [concrete(route, seeded.values) for route in UI_GET_ROUTES if route != urls.home]
    paths += ["/ui/nothing-here", "/ui/audit?since=bad"]
    for path in paths:
        response = browse.get(path, follow_redirects=True)
        csp = response.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp, path
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp, path
        assert "frame-ancestors 'none'" in csp, path
        assert response.headers.get("x-content-type-options") == "nosniff", path
        assert response.headers.get("cache-control") == "no-store", path


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (httpx would normalise ../ away)."""
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=30)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_static_serves_the_known_assets_only(seeded: Seeded, browse: Browser) -> None:
    for name, path in ASSETS.items():
        response = browse.get(urls.static(name))
        assert response.status_code == 200, name
        if name.startswith("docs/"):  # the API docs' bundles, with CDN URLs pointed here
            assert len(response.content) > 0.9 * path.stat().st_size, name
        else:
            assert response.content == path.read_bytes(), name
        assert response.headers["x-content-type-options"] == "nosniff"
    types = {"ui.css": "text/css", "ui.js": "text/javascript", "favicon.svg": "image/svg+xml"}
    for name, kind in types.items():
        assert browse.get(urls.static(name)).headers["content-type"].startswith(kind), name
    secret_bytes = Path(__file__).read_bytes()[:40]
    for attempt in (
        "/static/../tests/test_ui.py",
        "/static/..%2f..%2ftests%2ftest_ui.py",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/docs/../../../pyproject.toml",
        "/static/ui.css/../../api.py",
        "/static//etc/passwd",
        "/static/templates/layout.html",
        "/static/api.py",
        "/static/docs/",
        "/static/",
    ):
        status, body = raw_get(seeded.server.url, attempt)
        assert status == 404, (attempt, status, body[:200])
        assert secret_bytes not in body and b"[project]" not in body, attempt


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_this_server(
    seeded: Seeded, browse: Browser, path: str
) -> None:
    page = browse.get(path)
    assert page.status_code == 200, page.text
    assert not re.search(r"https?://", page.text), re.findall(r"https?://[^\s'\"]+", page.text)
    assets = [link.url for link in parts(page).links]
    assets += re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)  # the Swagger config
    assert assets, page.text
    loaded = 0
    for asset in assets:
        assert asset.startswith("/"), asset
        assert asset.startswith(("/static/", "/openapi.json")), asset
        assert browse.get(asset).status_code == 200, asset
        loaded += 1
    scripts = [link.url for link in parts(page).links if link.tag == "script"]
    assert scripts and all(s.startswith("/static/docs/") for s in scripts), scripts
    assert loaded >= 2


# --- registry/ui/views.py ------------------------------------------------------------------------

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def version(number: int, **metrics: float) -> VersionOut:
    return VersionOut(
        adapter="team/summarizer",
        number=number,
        digest="sha256:" + "0" * 64,
        base_model_id=None,
        base_model_revision=None,
        peft_type="LORA",
        task_type=None,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        use_dora=False,
        use_rslora=False,
        adapter_config={},
        metrics=metrics,
        labels={},
        lineage={},
        description=None,
        size=1,
        file_count=1,
        created_at=T0 + timedelta(hours=number),
        created_by=None,
    )


def test_metric_names_are_every_metric_in_name_order() -> None:
    versions = [version(1, rougeL=0.4), version(2, bleu=0.2, rougeL=0.5), version(3)]
    assert views.metric_names(versions) == ["bleu", "rougeL"]
    assert views.metric_names([]) == []


def test_a_chart_has_one_point_per_version_with_the_metric_oldest_left() -> None:
    # Newest first, as the adapter page passes them; v2 has no rougeL.
    versions = [
        version(4, rougeL=0.45),
        version(3, rougeL=0.5),
        version(2, bleu=1.0),
        version(1, rougeL=0.4),
    ]
    chart = views.chart("rougeL", versions)
    assert chart is not None
    assert [p.number for p in chart.points] == [1, 3, 4]
    assert [p.value for p in chart.points] == [0.4, 0.5, 0.45]
    xs = [p.x for p in chart.points]
    assert xs == sorted(xs) and xs[0] == chart.pad and xs[-1] == chart.width - chart.pad
    assert (chart.low, chart.high) == (0.4, 0.5)
    assert chart.best.number == 3
    top, bottom = chart.pad, chart.height - chart.pad
    assert chart.best.y == pytest.approx(top)  # the best is drawn highest
    assert chart.points[0].y == pytest.approx(bottom)  # the lowest at the bottom
    assert chart.points[2].y == pytest.approx((top + bottom) / 2)
    assert chart.line == " ".join(f"{p.x:.1f},{p.y:.1f}" for p in chart.points)
    assert len(chart.line.split()) == 3


def test_a_single_version_chart_is_one_point_in_the_middle() -> None:
    chart = views.chart("rougeL", [version(7, rougeL=0.3)])
    assert chart is not None and len(chart.points) == 1
    (point,) = chart.points
    assert point.number == 7 and chart.best == point
    assert point.x == pytest.approx(chart.width / 2)
    assert chart.pad <= point.y <= chart.height - chart.pad
    assert len(chart.line.split()) == 1


def test_equal_values_chart_as_a_flat_line() -> None:
    chart = views.chart("acc", [version(1, acc=0.5), version(2, acc=0.5)])
    assert chart is not None
    assert chart.points[0].y == chart.points[1].y
    assert all(chart.pad <= p.y <= chart.height - chart.pad for p in chart.points)


def test_non_finite_values_are_left_out_of_a_chart() -> None:
    versions = [
        version(1, loss=math.nan),
        version(2, loss=0.3),
        version(3, loss=math.inf),
        version(4, loss=-math.inf),
        version(5, loss=0.2),
    ]
    chart = views.chart("loss", versions)
    assert chart is not None
    assert [p.number for p in chart.points] == [2, 5]
    assert all(math.isfinite(v) for p in chart.points for v in (p.x, p.y, p.value))
    assert views.chart("loss", [version(1, loss=math.nan)]) is None
    assert views.chart("missing", versions) is None
    assert views.chart("loss", []) is None


def move(
    alias: str, version_: int | None, previous: int | None, minutes: int, actor: str
) -> AliasMoveOut:
    return AliasMoveOut(
        adapter="team/summarizer",
        alias=alias,
        previous=previous,
        version=version_,
        at=T0 + timedelta(minutes=minutes),
        actor=actor,
    )


def test_timelines_are_spans_per_alias_newest_first() -> None:
    moves = [
        move("staging", 2, 1, 30, "bob"),
        move("production", 2, None, 20, "admin"),
        move("staging", None, 2, 40, "carol"),  # removed
        move("staging", 1, None, 10, "alice"),
    ]
    timelines = views.timelines(moves)
    assert list(timelines) == ["production", "staging"]
    staging = timelines["staging"]
    at = [T0 + timedelta(minutes=m) for m in (10, 30, 40)]
    assert [(s.version, s.previous, s.start, s.end, s.actor) for s in staging] == [
        (None, 2, at[2], None, "carol"),
        (2, 1, at[1], at[2], "bob"),
        (1, None, at[0], at[1], "alice"),
    ]
    (production,) = timelines["production"]
    assert (production.version, production.end, production.actor) == (2, None, "admin")
    # "What was staging at 09:35?" v2, moved there by bob; at 09:30 sharp too, not at 09:40.
    assert [s.version for s in staging if s.covers(T0 + timedelta(minutes=35))] == [2]
    assert [s.version for s in staging if s.covers(at[1])] == [2]
    assert [s.version for s in staging if s.covers(at[2])] == [None]
    assert [s for s in staging if s.covers(T0)] == []
    assert views.timelines([]) == {}


def test_timelines_read_naive_times_as_utc() -> None:
    naive = AliasMoveOut(
        adapter="team/summarizer", alias="staging", previous=None, version=1,
        at=datetime(2026, 11, 24, 9, 0), actor=None,
    )  # fmt: skip
    (span,) = views.timelines([naive])["staging"]
    assert span.start == T0 and span.start.tzinfo is not None


# --- registry/ui/urls.py -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "subject", "details", "expected"),
    [
        ("version.push", "team/a@3", {}, "/ui/adapters/team/a/versions/3"),
        ("version.yank", "team/a@3", {"reason": "x"}, "/ui/adapters/team/a/versions/3"),
        ("alias.set", "team/a@production", {"version": 2}, "/ui/adapters/team/a"),
        ("alias.remove", "team/a@staging", {}, "/ui/adapters/team/a"),
        ("deployment.load", "team/a@4", {}, "/ui/adapters/team/a/versions/4"),
        ("merge.requested", "team/a@3", {"job": "ab" * 16}, "/ui/jobs/" + "ab" * 16),
        ("merge.succeeded", "team/a@3", {}, "/ui/adapters/team/a/versions/3"),
        ("base.add", "org/model@abc", {}, "/ui/bases/org/model@abc"),
        ("token.create", "ci-bot", {"scope": "read"}, "/ui/tokens"),
        ("token.revoke", "ci-bot", {}, "/ui/tokens"),
        ("gc", "blobs", {}, None),
        ("version.push", "a/b/c@1", {}, None),
        ("version.push", "/a@1", {}, None),
        ("version.push", "", {}, None),
    ],
)
def test_an_audit_event_links_to_its_subject(
    action: str, subject: str, details: dict[str, Any], expected: str | None
) -> None:
    assert urls.event_subject(action, subject, details) == expected


def test_urls_quote_what_they_carry() -> None:
    assert urls.alias("team/a", "a b/c") == "/ui/adapters/team/a/aliases/a%20b%2Fc"
    assert urls.alias_delete("team/a", "x?y") == "/ui/adapters/team/a/aliases/x%3Fy/delete"
    assert urls.job("a/../b") == "/ui/jobs/a%2F..%2Fb"
    assert urls.token_revoke("a#b") == "/ui/tokens/a%23b/revoke"
    assert urls.base("org/model@rev 1") == "/ui/bases/org/model@rev%201"
    assert (
        urls.sign_in("/ui/adapters?q=a&b=c") == "/ui/sign-in?next=%2Fui%2Fadapters%3Fq%3Da%26b%3Dc"
    )
    assert urls.sign_in() == urls.sign_in_page
    # Filters: empty ones are left out, lists repeat, values are encoded.
    assert urls.adapters(q="", namespace=None, label=[]) == "/ui/adapters"
    assert (
        urls.adapters(q="a b", label=["task=sum", "lang=en"])
        == "/ui/adapters?q=a+b&label=task%3Dsum&label=lang%3Den"
    )
    assert urls.adapter("team/a", sort="-metrics.rougeL", offset=50) == (
        "/ui/adapters/team/a?sort=-metrics.rougeL&offset=50"
    )
    assert urls.audit(actor="x&y") == "/ui/audit?actor=x%26y"
    assert urls.version("team/a", 3) == "/ui/adapters/team/a/versions/3"
    assert urls.yank("team/a", 3) == "/ui/adapters/team/a/versions/3/yank"
    assert urls.static("docs/redoc.standalone.js") == "/static/docs/redoc.standalone.js"


def test_every_ui_route_is_built_by_urls() -> None:
    """The pages link only through `urls`: each UI GET route is one of its outputs."""
    built = {
        urls.home, urls.sign_in_page, urls.adapters(), urls.adapter("n/a"), urls.version("n/a", 1),
        urls.bases, urls.base("o/m"), urls.jobs(), urls.job("j"), urls.job_status("j"),
        urls.audit(), urls.tokens,
    }  # fmt: skip
    values = {"namespace": "n", "name": "a", "number": "1", "ref:path": "o/m", "job_id": "j"}
    assert {concrete(route, values) for route in UI_GET_ROUTES} == built

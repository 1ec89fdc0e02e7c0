"""The web UI in a real Chromium (Playwright), against a real `lora-reg server` (auth on, the
embedded merge worker) holding real PEFT adapters pushed with the CLI.

What a person does: sign in with a token, browse adapters -> adapter -> version, sort by a
metric, read the charts, move aliases (a write token is refused on `production`, an admin is
not), see the moves in the timeline and the audit log, request a merge and watch its job finish
without reloading. Every page is watched: no request leaves this server's origin and the console
stays free of errors. Screenshots of the main pages (laptop and phone widths) are written to
`artifacts/ui/` (git-ignored; CI keeps them) for people to look at.

Chromium is the system's (`apt-get install chromium`): Playwright cannot download its own
browser here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ROOT, RunningServer, own_server

CHROMIUM = os.environ.get("LORA_REG_TEST_CHROMIUM") or shutil.which("chromium") or ""
ARTIFACTS = Path(os.environ.get("LORA_REG_TEST_ARTIFACTS", ROOT / "artifacts")) / "ui"
ADAPTER = "team/summarizer"
ROUGE = [0.31, 0.38, 0.35, 0.41]  # rougeL of versions 1-4: sorted by it, 4, 2, 3, 1
TIMEOUT_MS = 30_000  # a busy 2-core CI machine renders Swagger UI slowly
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The system Chromium, for this module only: Playwright's sync API keeps an event loop
    running in the main thread while it is started, which would make every later `asyncio.run`
    in the suite fail (why this is not pytest-playwright's session-wide `browser`)."""
    if not CHROMIUM:
        pytest.fail("no Chromium: apt-get install chromium (or set LORA_REG_TEST_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # Root in a container needs --no-sandbox; the rest keeps Chromium off the network.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


@dataclass
class Registry:
    server: RunningServer
    tokens: dict[str, str] = field(default_factory=dict)  # scope -> secret

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def registry(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> Iterator[Registry]:
    """A server with auth on and the embedded worker; a registered base, four versions of
    team/summarizer with metrics, staging and production set, and one token per scope."""
    workdir = tmp_path_factory.mktemp("ui-browser")
    with own_server(
        request, workdir, "sqlite-folder", LORA_REG_AUTH="on", LORA_REG_EMBEDDED_WORKER="true"
    ) as server:
        found = Registry(server, {"admin": server.token or ""})

        def cli(*args: str) -> str:
            done = server.cli(*args)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        cli("base", "add", "tiny/llama", "--from", str(base_dir("llama")))
        for seed, rouge in enumerate(ROUGE):
            cli(
                "push", str(adapter_dir("llama", seed=seed)), ADAPTER,
                "--base", "tiny/llama",
                "--metric", f"rougeL={rouge}",
                "--metric", f"bleu={0.2 + seed / 100}",
                "--label", "task=summarize",
                "--lineage", f"run=https://wandb.ai/team/runs/{seed}",
            )  # fmt: skip
        cli("alias", "set", f"{ADAPTER}@3", "staging")
        cli("alias", "set", f"{ADAPTER}@3", "production")
        for scope in ("read", "write"):
            out = cli("token", "create", f"ui-{scope}", "--scope", scope, "--json")
            found.tokens[scope] = re.search(r"lrt_[A-Za-z0-9_-]{43}", out).group(0)  # type: ignore[union-attr]
        yield found


@dataclass
class Watch:
    """What pages did that they must not: requests to another origin, console errors."""

    origin: str
    foreign: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_request(req: Any) -> None:
            if not req.url.startswith((self.origin + "/", "data:", "blob:")):
                self.foreign.append(req.url)

        def on_console(message: Any) -> None:
            # A refusal page's own status (401, 403, 404) is logged as "Failed to load
            # resource" at the page's URL: the tests check those statuses themselves. Anything
            # else (a script error, a missing asset) is a defect.
            own_status = message.location.get("url") == page.url and message.text.startswith(
                "Failed to load resource"
            )
            if message.type == "error" and not own_status:
                self.console.append(f"{page.url}: {message.text}")

        def on_response(response: Any) -> None:
            if response.request.resource_type != "document" and response.status >= 400:
                self.console.append(f"{page.url}: {response.url} answered {response.status}")

        page.on("request", on_request)
        page.on("console", on_console)
        page.on("response", on_response)
        page.on("pageerror", lambda exc: self.console.append(f"{page.url}: {exc}"))


@pytest.fixture
def watched(browser: Any, registry: Registry) -> Iterator[tuple[Any, Watch]]:
    """A fresh browser context (no cookies) whose every page is watched; at the end, no
    request went to another origin and no page logged a console error."""
    context = browser.new_context(base_url=registry.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    watch = Watch(registry.url)
    page = context.new_page()
    watch.attach(page)
    yield page, watch
    context.close()
    assert watch.foreign == [], f"requests to other origins: {watch.foreign}"
    assert watch.console == [], f"console errors: {watch.console}"


def sign_in(page: Any, token: str, start: str = "/ui/adapters") -> None:
    page.goto(start)
    expect(page).to_have_url(re.compile(r"/ui/sign-in\?next="))
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(start) + "$"))


def sign_out(page: Any) -> None:
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/sign-in"))


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def column(page: Any, metric: str) -> list[float]:
    cells = page.locator(f"#versions tbody td[data-metric='{metric}']").all_inner_texts()
    return [float(text) for text in cells]


def version_links(page: Any) -> list[str]:
    return page.locator("#versions tbody tr td:first-child a").all_inner_texts()


def test_a_signed_out_visitor_signs_in_and_lands_where_they_were_going(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    page, _ = watched
    page.goto(f"/ui/adapters/{ADAPTER}")
    expect(page).to_have_url(re.compile(r"/ui/sign-in\?next=%2Fui%2Fadapters%2Fteam"))
    shoot(page, "sign-in")
    page.get_by_label("Token").fill("lrt_" + "A" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("unknown token")
    page.get_by_label("Token").fill(registry.tokens["read"])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(f"/ui/adapters/{ADAPTER}$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(ADAPTER)
    cookie = next(c for c in page.context.cookies() if c["name"] == "lr_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert registry.tokens["read"] not in page.url
    sign_out(page)
    page.goto("/ui/adapters")
    expect(page).to_have_url(re.compile(r"/ui/sign-in"))


def test_browse_adapters_sort_by_a_metric_and_read_the_charts(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    page, _ = watched
    sign_in(page, registry.tokens["read"])
    row = page.get_by_role("row").filter(has_text=ADAPTER)
    expect(row).to_contain_text("v4")
    expect(row).to_contain_text("production")
    shoot(page, "adapters")

    page.get_by_role("link", name=ADAPTER).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(ADAPTER)
    assert version_links(page) == ["v4", "v3", "v2", "v1"]
    # The chart: one point per version, the best (v4) marked.
    chart = page.locator("svg[data-metric='rougeL']")
    expect(chart.locator("circle")).to_have_count(len(ROUGE))
    assert chart.locator("circle.best").get_attribute("data-version") == "4"
    shoot(page, "adapter")

    page.locator("#versions thead").get_by_role("link", name="rougeL").click()
    expect(page).to_have_url(re.compile(r"sort=-metrics.rougeL"))
    assert column(page, "rougeL") == sorted(ROUGE, reverse=True)
    assert version_links(page) == ["v4", "v2", "v3", "v1"]
    page.locator("#versions thead").get_by_role("link", name="rougeL").click()
    expect(page).to_have_url(re.compile(r"sort=metrics.rougeL"))
    assert column(page, "rougeL") == sorted(ROUGE)
    page.reload()  # the sort is in the URL
    assert column(page, "rougeL") == sorted(ROUGE)

    page.get_by_role("link", name="v2", exact=True).first.click()
    expect(page).to_have_url(re.compile(f"/ui/adapters/{ADAPTER}/versions/2$"))
    expect(page.locator("#pull-command")).to_have_value(f"lora-reg pull {ADAPTER}@2 ./summarizer")
    expect(page.get_by_role("cell", name="adapter_model.safetensors")).to_be_visible()
    expect(page.get_by_text("compatible").first).to_be_visible()
    page.get_by_text("LoRA modules").click()  # the module table
    expect(page.get_by_role("cell", name="model.layers.0.self_attn.q_proj").first).to_be_visible()
    expect(page.get_by_role("link", name="https://wandb.ai/team/runs/1")).to_be_visible()
    # A read token sees no forms that would be refused.
    expect(page.get_by_role("button", name="Request merge")).to_have_count(0)
    shoot(page, "version")

    page.get_by_role("link", name="tiny/llama").first.click()
    expect(page.get_by_role("heading", level=1)).to_have_text("tiny/llama")
    expect(page.get_by_role("link", name=ADAPTER)).to_be_visible()
    shoot(page, "base")


def move_alias(page: Any, alias: str, version: int) -> None:
    form = page.get_by_role("form", name="Move an alias")
    form.get_by_label("Alias").fill(alias)
    form.get_by_label("Version").fill(str(version))
    form.get_by_role("button", name="Move alias").click()


def test_alias_moves_show_in_the_timeline_and_audit_and_production_is_protected(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    page, _ = watched
    sign_in(page, registry.tokens["write"], f"/ui/adapters/{ADAPTER}")
    move_alias(page, "staging", 2)
    expect(page).to_have_url(re.compile(f"/ui/adapters/{ADAPTER}#aliases$"))
    staging = page.locator("table.timeline[data-alias='staging'] tbody tr").first
    expect(staging).to_contain_text("v2")
    expect(staging).to_contain_text("(from v3)")
    expect(staging).to_contain_text("ui-write")
    expect(staging).to_contain_text("now")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit").click()
    first = page.locator("#audit tbody tr").first
    expect(first).to_contain_text("alias.set")
    expect(first).to_contain_text("ui-write")
    expect(first).to_contain_text(f"{ADAPTER}@staging")
    shoot(page, "audit")
    first.get_by_role("link", name=f"{ADAPTER}@staging").click()  # each row links its subject
    expect(page).to_have_url(re.compile(f"/ui/adapters/{ADAPTER}$"))

    # production is protected: the same refusal, word for word, as the CLI's.
    move_alias(page, "production", 2)
    expect(page.get_by_role("alert")).to_contain_text("protected_alias")
    writer = {"LORA_REG_TOKEN": registry.tokens["write"]}
    cli = registry.server.cli("alias", "set", f"{ADAPTER}@2", "production", env=writer)
    assert cli.returncode != 0
    message = page.get_by_role("alert").inner_text().split(": ", 1)[1].strip()
    assert " ".join(message.split()) in " ".join(cli.stderr.split()), (message, cli.stderr)
    shoot(page, "refusal")
    sign_out(page)

    sign_in(page, registry.tokens["admin"], f"/ui/adapters/{ADAPTER}")
    move_alias(page, "production", 2)
    production = page.locator("table.timeline[data-alias='production'] tbody tr").first
    expect(production).to_contain_text("v2")
    expect(production).to_contain_text("admin")
    history = httpx.get(
        f"{registry.url}/api/v1/adapters/{ADAPTER}/history?alias=production",
        headers={"Authorization": f"Bearer {registry.tokens['admin']}"},
    ).json()["items"]
    assert (history[0]["version"], history[0]["actor"]) == (2, "admin")


def test_a_merge_requested_in_the_ui_reaches_succeeded_without_a_reload(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    page, _ = watched
    sign_in(page, registry.tokens["write"], f"/ui/adapters/{ADAPTER}/versions/4")
    page.get_by_role("form", name="Request a merge").get_by_role(
        "button", name="Request merge"
    ).click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f]+$"))
    landed = page.url
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    status = page.locator("#job-status .job")
    expect(status).to_have_attribute("data-status", "succeeded", timeout=120_000)
    assert navigations == [] and page.url == landed  # the page updated itself
    expect(page.locator("#job-status")).to_contain_text("Output")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)  # nothing to cancel
    shoot(page, "job")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    expect(page.locator("tbody tr").first).to_contain_text("succeeded")
    shoot(page, "jobs")


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    page, _ = watched
    sign_in(page, registry.tokens["admin"], f"/ui/adapters/{ADAPTER}")
    before = page.locator("table.timeline[data-alias='staging'] tbody tr").first.inner_text()
    # The browser's own cookies (signed in), but a form that did not come from our page.
    answer = page.request.post(
        f"/ui/adapters/{ADAPTER}/aliases",
        form={"alias": "staging", "version": "1"},
        max_redirects=0,
    )
    assert answer.status == 403 and "not_permitted" in answer.text()
    forged = page.request.post(
        f"/ui/adapters/{ADAPTER}/aliases",
        form={"alias": "staging", "version": "1", "csrf": "x" * 43},
        max_redirects=0,
    )
    assert forged.status == 403
    page.reload()
    after = page.locator("table.timeline[data-alias='staging'] tbody tr").first.inner_text()
    assert after == before


def test_every_main_page_at_laptop_and_phone_width(
    watched: tuple[Any, Watch], registry: Registry
) -> None:
    """Screenshots for people to look at, and a page never wider than a phone's screen."""
    page, _ = watched
    sign_in(page, registry.tokens["admin"])
    pages = {
        "adapters": "/ui/adapters",
        "adapter": f"/ui/adapters/{ADAPTER}",
        "version": f"/ui/adapters/{ADAPTER}/versions/3",
        "bases": "/ui/bases",
        "jobs": "/ui/jobs",
        "audit": "/ui/audit",
        "tokens": "/ui/tokens",
        "empty-search": "/ui/adapters?q=nothing-like-this",
        "not-found": "/ui/adapters/team/none",
        "api-docs": "/docs",
        "redoc": "/redoc",
    }
    for width, height, suffix in ((1280, 900, ""), (390, 844, "-phone")):
        page.set_viewport_size({"width": width, "height": height})
        for name, path in pages.items():
            page.goto(path)
            if name == "api-docs":
                expect(page.locator("#swagger-ui .info .title")).to_contain_text("lora-registry")
                expect(page.get_by_text("/api/v1/adapters").first).to_be_visible()
            elif name == "redoc":
                expect(page.locator("h1").first).to_contain_text("lora-registry")
            else:
                expect(page.get_by_role("heading", level=1)).to_be_visible()
                overflow = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert overflow <= 1, f"{path} is {overflow}px wider than a {width}px screen"
            shoot(page, name + suffix)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto("/ui/tokens")
    form = page.get_by_role("form", name="Create a token")
    form.get_by_label("Name").fill("ui-made")
    form.get_by_label("Scope").select_option("read")
    form.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token").input_value()
    assert secret.startswith("lrt_")
    whoami = httpx.get(
        f"{registry.url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"}
    )
    assert whoami.json()["name"] == "ui-made"
    page.goto("/ui/tokens")  # shown once: not on the page any more
    expect(page.locator("#new-token")).to_have_count(0)

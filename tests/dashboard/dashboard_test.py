#!/usr/bin/env python3
"""The hub's dashboard in a real browser (Debian's Chromium, headless, through
Playwright), run by tests/tests/dashboard_e2e.rs against a real hub.

    dashboard_test.py operator|large

Environment: HUB_URL (http://127.0.0.1:PORT), OUTPOST_CHROMIUM (the browser),
SHOTS (a folder for the screenshots), TOKEN_VIEWER, and for `operator` also
TOKEN_AUTHOR, TOKEN_APPROVER, TOKEN_ADMIN and AGENTS (comma-separated ids).

What only the Rust test can do it is asked for on stdout, one line each
(`kill gw-2`, `start gw-2`), and it answers on stdin once done. Exits 0 when
every check held, 1 with the reason on stderr when one did not.
"""

import json
import os
import re
import sys
import time

from playwright.sync_api import expect, sync_playwright

URL = os.environ["HUB_URL"]
SHOTS = os.environ.get("SHOTS", ".")

# How long the page may take to show an agent offline after its process was
# killed: docs/dashboard.md promises idle_timeout (30 s: a killed agent
# closes no QUIC connection, the hub times it out) plus one refresh (5 s);
# 10 s more for a loaded test machine.
OFFLINE_WITHIN_MS = 45_000
# Anything that waits on agents reconnecting or a policy push.
SLOW_MS = 90_000

POLICY = """description = "no debug data leaves the plants; temperatures also to the cloud"

[[rules]]
name = "no debug"
streams = ["plant/+/debug"]
action = "deny"

[[rules]]
name = "temperatures"
streams = ["plant/+/temp"]
sinks = ["store", "cloud-mqtt"]
"""


# The browser logs every 401 and 403 to its console; the scenarios cause
# some on purpose (a token nobody issued, a viewer's POST).
EXPECTED_REFUSAL = re.compile(r"status of 40[13]")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ask(request, want):
    """Asks the Rust test to do `request`; waits for its answer."""
    print(request, flush=True)
    got = sys.stdin.readline().strip()
    if got != want:
        raise AssertionError(f"asked {request!r}, the test answered {got!r}")


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)


def sign_in(page, token, who):
    page.goto(f"{URL}/dashboard/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_have_text(who)


def sign_out(page):
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Token")).to_be_visible()


def go(page, where):
    page.goto(f"{URL}/dashboard/#/{where}")


def health(page, agent):
    return page.locator(f'tr[data-agent="{agent}"] td').nth(1)


# A sink's numbers as the Sinks page shows them: queue, lag (s; 0 for none),
# delivered and failures; null before its row is there.
SINK_NUMBERS = """(sink) => {
  const row = document.querySelector(`tr[data-sink="${sink}"]`);
  if (!row) return null;
  const n = (i) => {
    const m = row.querySelector(`td:nth-child(${i})`).textContent.replace(/,/g, '').match(/\\d+(\\.\\d+)?/);
    return m ? Number(m[0]) : 0;
  };
  return { pending: n(2), lag: n(3), delivered: n(4), failures: n(8) };
}"""


def sink_numbers(page, sink):
    got = page.evaluate(SINK_NUMBERS, sink)
    if got is None:
        raise AssertionError(f"no row for sink {sink} on the Sinks page")
    return got


def operator(page):
    agents = os.environ["AGENTS"].split(",")

    # A token nobody issued is refused, and the page says so.
    page.goto(f"{URL}/dashboard/")
    page.get_by_label("Token").fill("opt_" + "0" * 64)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("Signed out")

    # Sign in; the fleet shows every agent, connected.
    sign_in(page, os.environ["TOKEN_AUTHOR"], "token:alice · policy-author")
    go(page, "fleet")
    for a in agents:
        expect(health(page, a)).to_have_text("connected", timeout=SLOW_MS)
    expect(page.locator("#fleet-range")).to_have_text(f"Agents 1–{len(agents)} of {len(agents)}")

    # An agent killed -9 turns offline within the documented time, and
    # connected again once restarted. The page refreshes itself.
    victim = agents[1]
    ask(f"kill {victim}", "killed")
    t0 = time.monotonic()
    expect(health(page, victim)).to_have_text("offline", timeout=OFFLINE_WITHIN_MS)
    log(f"{victim} shown offline {time.monotonic() - t0:.1f} s after SIGKILL")
    ask(f"start {victim}", "started")
    expect(health(page, victim)).to_have_text("connected", timeout=SLOW_MS)

    # The label filter is the server's.
    page.get_by_label("Labels").fill("site=south")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#fleet-range")).to_have_text("Agents 1–1 of 1")
    page.get_by_label("Labels").fill("")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#fleet-range")).to_have_text(f"Agents 1–{len(agents)} of {len(agents)}")

    # The policy author proposes (two-person approval) after a dry run.
    go(page, "policy")
    expect(page.locator("#policy-version")).to_contain_text("Version 1 in force")
    page.get_by_label("Policy text").fill(POLICY)
    page.get_by_role("button", name="Dry run").click()
    expect(page.locator("#dry-run")).to_contain_text("valid")
    expect(page.locator("#dry-run")).to_contain_text("plant/line1/debug")
    shot(page, "policy-dry-run")
    page.get_by_role("button", name="Propose", exact=True).click()
    expect(page.locator("#policy-result")).to_contain_text("Proposed as proposal 1")
    # Not for the author to approve.
    expect(page.get_by_role("button", name="Approve proposal 1")).to_have_count(0)
    sign_out(page)

    # The approver approves it; it is in force, and reaches every agent.
    sign_in(page, os.environ["TOKEN_APPROVER"], "token:bob · approver")
    go(page, "policy")
    page.get_by_role("button", name="Approve proposal 1").click()
    expect(page.locator("#policy-version")).to_contain_text("Version 2 in force")
    # What changed from the version before.
    page.locator("#diff-from").select_option("1")
    page.locator("#diff-to").select_option("2")
    page.get_by_role("button", name="Show diff").click()
    expect(page.locator("pre.diff")).to_contain_text('+streams = ["plant/+/debug"]')
    shot(page, "policy")
    go(page, "fleet")
    for a in agents:
        expect(page.locator(f'tr[data-agent="{a}"] td').nth(6)).to_have_text(
            "v2 of v2", timeout=SLOW_MS
        )
    # Each agent's stored-event rate, from the page's successive readings of
    # the hub's counters: a sparkline of four rates or more. The plant
    # publishes one temperature every 200 ms to every agent (its debug
    # readings are denied now): about 5 events/s each (20 allows for bursts).
    for a in agents:
        page.wait_for_function(
            """(a) => { const c = document.querySelector(`tr[data-agent="${a}"] td[data-rate]`);
                       return c && c.dataset.rate !== '' && c.querySelectorAll('svg polyline').length === 1
                         && c.querySelector('polyline').getAttribute('points').split(' ').length >= 4; }""",
            arg=a,
            timeout=SLOW_MS,
        )
    page.wait_for_function(
        """(agents) => agents.every((a) => {
             const r = Number(document.querySelector(`tr[data-agent="${a}"] td[data-rate]`).dataset.rate);
             return r > 0 && r <= 20; })""",
        arg=agents,
        timeout=SLOW_MS,
    )
    shown = [page.locator(f'tr[data-agent="{a}"] td[data-rate]').get_attribute("data-rate") for a in agents]
    log(f"stored events/s on the Fleet page: {dict(zip(agents, shown))}")
    shot(page, "fleet")

    # The audit view has the proposal and the approval, and a sound chain.
    go(page, "audit")
    expect(page.locator("#audit-verdict")).to_contain_text("intact")
    page.get_by_label("Action").fill("policy.")
    trail = page.get_by_role("table", name="Audit entries")
    expect(trail.locator("tr", has_text="policy.proposed")).to_contain_text("token:alice")
    expect(trail.locator("tr", has_text="policy.approved")).to_contain_text("token:bob")
    expect(page.locator("#anchor")).to_have_text(lambda_re(r"^\d+:[0-9a-f]{64}$"))
    shot(page, "audit")

    # One agent: its labels, certificate and streams' last values (pymodbus's
    # register on gw-3).
    go(page, "agent/gw-3")
    expect(page.get_by_role("table", name="Streams")).to_contain_text("731", timeout=SLOW_MS)
    expect(page.locator("dl.kv")).to_contain_text("site=south")
    expect(page.locator("dl.kv")).to_contain_text("serial")
    shot(page, "agent")

    # The sink the policy routes temperatures to delivers.
    go(page, "sinks")
    sink = page.locator('tr[data-sink="cloud-mqtt"]')
    expect(sink).to_be_visible()
    page.wait_for_function(
        """() => { const c = document.querySelector('tr[data-sink="cloud-mqtt"] td:nth-child(4)');
                   return c && Number(c.textContent.replace(/,/g, '')) > 0; }""",
        timeout=SLOW_MS,
    )

    # Its broker stopped, the temperatures queue for it: the page shows the
    # queue and the lag growing (read twice, the second higher than the
    # first) and the failures counted with their error...
    before = sink_numbers(page, "cloud-mqtt")
    ask("stop sink-broker", "stopped")
    page.wait_for_function(
        f"""(b) => {{ const n = ({SINK_NUMBERS})("cloud-mqtt");
                     return n && n.pending >= 5 && n.lag >= 2 && n.failures > b.failures; }}""",
        arg=before,
        timeout=SLOW_MS,
    )
    first = sink_numbers(page, "cloud-mqtt")
    page.wait_for_function(
        f"""(f) => {{ const n = ({SINK_NUMBERS})("cloud-mqtt");
                     return n && n.pending > f.pending && n.lag > f.lag; }}""",
        arg=first,
        timeout=SLOW_MS,
    )
    second = sink_numbers(page, "cloud-mqtt")
    log(f"cloud-mqtt with its broker stopped: {first} then {second}")
    if second["delivered"] != first["delivered"]:
        raise AssertionError(f"delivered with its broker stopped: {first} then {second}")
    expect(sink.locator("td").nth(8)).not_to_have_text("—")
    shot(page, "sinks-outage")
    # ...and once it is back, the queue drains: everything that waited is
    # delivered and the lag falls back to what a live feed has.
    ask("start sink-broker", "started")
    page.wait_for_function(
        f"""(s) => {{ const n = ({SINK_NUMBERS})("cloud-mqtt");
                     return n && n.delivered >= s.delivered + s.pending && n.pending < s.pending && n.lag < 5; }}""",
        arg=second,
        timeout=SLOW_MS,
    )
    log(f"cloud-mqtt drained: {sink_numbers(page, 'cloud-mqtt')}")
    shot(page, "sinks")
    sign_out(page)

    # A viewer sees no button that changes anything...
    sign_in(page, os.environ["TOKEN_VIEWER"], "token:vera · viewer")
    go(page, "policy")
    expect(page.locator("#policy-version")).to_contain_text("Version 2 in force")
    for name in ["Propose", "Apply", "Dry run", "Approve proposal 1"]:
        expect(page.get_by_role("button", name=name)).to_have_count(0)
    expect(page.get_by_role("link", name="Enrollment")).to_be_hidden()
    go(page, "commands")
    expect(page.get_by_role("table", name="Commands")).to_be_visible()
    expect(page.get_by_role("button", name="Send command")).to_have_count(0)
    go(page, "agent/gw-1")
    expect(page.locator("dl.kv")).to_contain_text("site=north")
    expect(page.get_by_role("button", name="Change labels")).to_have_count(0)
    expect(page.get_by_role("button", name="Revoke")).to_have_count(0)
    # ...and the API refuses the call anyway, from the same page.
    status = page.evaluate(
        """async (token) => (await fetch('/api/v1/policy', {method: 'POST',
              headers: {Authorization: `Bearer ${token}`, 'Content-Type': 'application/json'},
              body: JSON.stringify({text: '[[rules]]\\nstreams = ["plant/#"]\\naction = "deny"\\n'})})).status""",
        os.environ["TOKEN_VIEWER"],
    )
    if status != 403:
        raise AssertionError(f"a viewer's POST /api/v1/policy answered {status}, not 403")
    sign_out(page)

    # The admin makes an enrollment token; it is listed, pending.
    sign_in(page, os.environ["TOKEN_ADMIN"], "token:root · admin")
    go(page, "enrollments")
    page.get_by_label("Agent id").fill("gw-9")
    page.get_by_label("Labels").fill("site=east")
    page.get_by_role("button", name="Create token").click()
    expect(page.locator("#enroll-token")).to_have_text(lambda_re(r"^\S{20,}$"))
    table = page.get_by_role("table", name="Enrollment tokens")
    expect(table.locator("tr", has_text="gw-9")).to_contain_text("pending")
    shot(page, "enrollments")

    # The admin (who may operate) sends gw-3 a read of its register; the
    # command is listed, with whatever the policy's [[commands]] made of it
    # (this policy grants none: refused, stored and listed all the same).
    go(page, "commands")
    page.get_by_label("Agent", exact=True).fill("gw-3")
    page.locator("#c-kind").select_option("read")
    page.get_by_label("Tag or topic").fill("press/pressure")
    page.get_by_role("button", name="Send command").click()
    commands = page.get_by_role("table", name="Commands")
    expect(commands.locator("tr", has_text="press/pressure")).to_contain_text("gw-3")
    expect(commands.locator("tr", has_text="press/pressure")).to_contain_text("token:root")
    shot(page, "commands")

    # The books: with the plant and the agents stopped, the KPI panel's
    # totals (read from the page) equal a scrape of the hub's Prometheus
    # endpoint, which the Rust test makes and compares. Until the last
    # deliveries land the two may differ: the page is read again.
    ask("quiesce", "quiet")
    go(page, "sinks")
    until = time.monotonic() + SLOW_MS / 1000
    while True:
        expect(page.locator('tr[data-kpi-sink="cloud-mqtt"]')).to_be_visible()
        shown = page.evaluate(KPI_NUMBERS)
        print(f"kpis {json.dumps(shown)}", flush=True)
        verdict = sys.stdin.readline().strip()
        if verdict == "equal":
            log(f"the KPI panel equals Prometheus: {shown}")
            break
        if time.monotonic() > until:
            raise AssertionError(f"the KPI panel never equalled Prometheus: {verdict}")
        # Read the API afresh.
        page.reload()


# The numbers of the Sinks page's KPI panel, as the API gave them (each
# cell's data-value; its text is that value formatted).
KPI_NUMBERS = """() => {
  const v = (e) => (e && e.dataset.value !== '' ? Number(e.dataset.value) : null);
  const sinks = {};
  for (const row of document.querySelectorAll('tr[data-kpi-sink]')) {
    const td = row.querySelectorAll('td');
    sinks[row.dataset.kpiSink] = { delivered: v(td[1]), p50: v(td[2]), p95: v(td[3]), p99: v(td[4]), count: v(td[5]) };
  }
  return { stored: v(document.getElementById('kpi-stored')), dropped: v(document.getElementById('kpi-dropped')), sinks };
}"""


def large(page):
    """A fleet of 1,200 (seeded): a page of it, filtered, sorted, next."""
    t0 = time.monotonic()
    sign_in(page, os.environ["TOKEN_VIEWER"], "token:vera · viewer")
    go(page, "fleet")
    expect(page.locator("#fleet-range")).to_have_text("Agents 1–50 of 1200")
    log(f"sign-in to the first page of 1200 agents: {time.monotonic() - t0:.2f} s")
    expect(page.locator("tbody tr")).to_have_count(50)
    page.get_by_label("Labels").fill("site=site-2")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#fleet-range")).to_have_text("Agents 1–50 of 300")
    # Sort by backlog, descending (two clicks), by keyboard.
    sort = page.locator('button[data-sort="backlog"]')
    sort.focus()
    page.keyboard.press("Enter")
    expect(page.locator('th[aria-sort="ascending"] button[data-sort="backlog"]')).to_have_count(1)
    page.locator('button[data-sort="backlog"]').focus()
    page.keyboard.press("Enter")
    expect(page.locator('th[aria-sort="descending"] button[data-sort="backlog"]')).to_have_count(1)
    backlogs = page.locator("tbody tr td:nth-child(5)").all_text_contents()
    values = [int(b.replace(",", "")) for b in backlogs]
    if values != sorted(values, reverse=True) or len(values) != 50:
        raise AssertionError(f"not sorted by backlog, descending: {values}")
    page.get_by_role("button", name="Next").click()
    expect(page.locator("#fleet-range")).to_have_text("Agents 51–100 of 300")
    shot(page, "fleet-1200")


def lambda_re(pattern):
    return re.compile(pattern)


def main():
    scenario = sys.argv[1]
    failures = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ["OUTPOST_CHROMIUM"],
            headless=True,
            # The tests run as root in a container, where Chromium's sandbox
            # cannot start.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        page.on("pageerror", lambda e: failures.append(f"script error in the page: {e}"))
        page.on(
            "console",
            lambda m: m.type == "error" and not EXPECTED_REFUSAL.search(m.text) and failures.append(f"console: {m.text}"),
        )
        try:
            {"operator": operator, "large": large}[scenario](page)
        except Exception:
            shot(page, f"failure-{scenario}")
            raise
        finally:
            browser.close()
    # Nothing failed in the page but the refusals the scenarios cause.
    if failures:
        raise AssertionError("; ".join(failures))
    log(f"{scenario}: every check held")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the reason, for the Rust test
        log(f"FAILED: {type(e).__name__}: {e}")
        sys.exit(1)

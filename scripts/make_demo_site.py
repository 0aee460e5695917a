#!/usr/bin/env python
"""Generate the `tiny` template's demo web site (``llmforge/templates/tiny/site/``), deterministically.

The demo's crawl stage serves this folder on loopback (``crawl.local_site: site``) and crawls it with the real
crawler, so the site is built to exercise what a crawl of a real documentation site meets:

* documentation for *Kestrel*, a made-up job queue for Python: a home page, a user guide, a command and settings
  reference (tables of options), tutorials (code blocks), release notes and a FAQ, all English prose from a
  seeded grammar over a vocabulary written for this site (no copied text), each page inside the same
  navigation and footer boilerplate that extraction has to strip;
* a ``robots.txt`` that disallows ``/drafts/`` (linked from the release notes, so the crawler must skip it);
* pages the data stage must drop: a keyword-spam "deals" page, a tag index that is nothing but links, a forum
  thread with a leaked API key (dropped whole), an old URL serving the install guide again (exact duplicate)
  and a patch release whose notes are a light edit of the previous one (near duplicate);
* a team page with e-mail addresses and phone numbers (fictional: ``example.org``, Ofcom drama and 555-01xx
  numbers) that the PII step redacts while keeping the page;
* the rest of a crawl's life: a link to a folder without its ``/`` (a 301 redirect), a broken link (404), a
  plain-text download (not HTML) and links to other hosts (out of scope).

Run from the repository root: ``python scripts/make_demo_site.py [--out DIR] [--seed N]``.
"""

from __future__ import annotations

import argparse
import html
import random
import shutil
from pathlib import Path

SEED = 20261202
OUT = Path(__file__).resolve().parent.parent / "llmforge" / "templates" / "tiny" / "site"

PROJECT = "Kestrel"

# ---------------------------------------------------------------------------------------------------------
# vocabulary written for this site

TOPICS: dict[str, dict[str, list[str]]] = {
    "queues": {
        "nouns": ["queue", "job", "priority", "payload", "producer", "backlog", "message", "channel"],
        "verbs": ["enqueue", "drain", "pause", "inspect", "route", "split"],
        "facts": [
            "A queue is only a name until the first job arrives, so there is nothing to create in advance.",
            "Jobs with the same priority leave the queue in the order they arrived.",
            "A paused queue still accepts new jobs; it only stops handing them to workers.",
        ],
    },
    "workers": {
        "nouns": ["worker", "process", "thread", "slot", "heartbeat", "supervisor", "pool", "lease"],
        "verbs": ["start", "stop", "restart", "scale", "supervise", "drain"],
        "facts": [
            "A worker that misses three heartbeats in a row is treated as gone and its jobs are released.",
            "Each worker takes one job per free slot, so a busy worker never hoards the backlog.",
            "Stopping a worker gently lets it finish the jobs it holds before it exits.",
        ],
    },
    "retries": {
        "nouns": ["retry", "failure", "backoff", "attempt", "deadline", "exception", "dead letter", "limit"],
        "verbs": ["retry", "give up on", "delay", "record", "catch", "count"],
        "facts": [
            "The delay before each retry doubles, with a little random jitter so retries do not arrive together.",
            "A job that fails more often than its limit allows moves to the dead letter queue for a person to read.",
            "Errors that cannot succeed on a second try, such as a missing function, are never retried.",
        ],
    },
    "scheduling": {
        "nouns": ["schedule", "timer", "cron entry", "time zone", "window", "calendar", "interval", "clock"],
        "verbs": ["schedule", "postpone", "repeat", "skip", "align", "shift"],
        "facts": [
            "Scheduled jobs are stored with a time in UTC and shown in the local time zone of the dashboard.",
            "A repeating job is enqueued once per interval even when the previous run is still going.",
            "If the scheduler was down, missed runs are enqueued once when it starts again, not once per miss.",
        ],
    },
    "storage": {
        "nouns": ["database", "table", "index", "connection", "transaction", "snapshot", "row", "migration"],
        "verbs": ["store", "migrate", "vacuum", "back up", "restore", "compact"],
        "facts": [
            "Every change to a job is one short transaction, so a crash never leaves a job half updated.",
            "Finished jobs are kept for seven days by default and then removed in small batches.",
            "A migration adds columns before it uses them, so old and new workers can run side by side.",
        ],
    },
    "monitoring": {
        "nouns": ["metric", "dashboard", "alert", "log line", "latency", "counter", "trace", "threshold"],
        "verbs": ["watch", "export", "graph", "alert on", "sample", "compare"],
        "facts": [
            "The dashboard refreshes every few seconds and never holds a lock on the job tables.",
            "Queue latency is the age of the oldest waiting job, which is what users feel first.",
            "Metrics are plain counters and histograms, so any time series database can read them.",
        ],
    },
    "deployment": {
        "nouns": [
            "container",
            "server",
            "release",
            "environment",
            "secret",
            "health check",
            "rollout",
            "host",
        ],
        "verbs": ["deploy", "roll back", "configure", "upgrade", "package", "probe"],
        "facts": [
            "A rolling upgrade replaces one worker at a time, so the queue never stops moving.",
            "The health check answers only when the worker can reach the database and read its settings.",
            "Settings can come from a file, from environment variables or from both, and the variables win.",
        ],
    },
    "security": {
        "nouns": ["token", "permission", "role", "password", "certificate", "audit log", "signature", "user"],
        "verbs": ["grant", "revoke", "rotate", "sign", "verify", "audit"],
        "facts": [
            "Payloads are signed when they are enqueued, and a worker refuses a job whose signature does not match.",
            "Tokens for the dashboard expire after a day and can be revoked at any moment.",
            "The audit log records who paused, resumed or deleted a queue, and when they did it.",
        ],
    },
}

ADJS = ["small", "busy", "quiet", "large", "slow", "careful", "shared", "separate", "new", "old", "single"]
PEOPLE = ["operators", "developers", "new users", "teams", "administrators", "maintainers"]
REASONS = [
    "because the default is safe for most projects",
    "so that nothing is lost when a machine restarts",
    "which keeps the behaviour easy to predict",
    "since the cost is small compared with a lost job",
    "so that the logs tell the whole story afterwards",
    "because a surprise at night is worse than a slow afternoon",
    "which makes the next upgrade much less stressful",
    "so that tests and production behave the same way",
]
OPENERS = [
    "In practice,",
    "Most of the time,",
    "For a start,",
    "As a rule,",
    "In our experience,",
    "Usually,",
]
LINKERS = ["However,", "In that case,", "On the other hand,", "Because of this,", "For example,", "Even so,"]


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class Writer:
    """Seeded sentences about one topic (plus a second topic for variety)."""

    def __init__(self, rng: random.Random, topic: str):
        self.rng = rng
        self.topic = topic
        other = rng.choice([t for t in TOPICS if t != topic])
        self.words = {k: TOPICS[topic][k] * 3 + TOPICS[other][k] for k in ("nouns", "verbs")}
        self.facts = list(TOPICS[topic]["facts"])
        rng.shuffle(self.facts)

    def noun(self) -> str:
        return self.rng.choice(self.words["nouns"])

    def verb(self) -> str:
        return self.rng.choice(self.words["verbs"])

    def sentence(self) -> str:
        r = self.rng
        n1, n2, v = self.noun(), self.noun(), self.verb()
        adj, who, why = r.choice(ADJS), r.choice(PEOPLE), r.choice(REASONS)
        forms = [
            f"{PROJECT} lets {who} {v} {article(adj + ' ' + n1)} without touching the {n2}, {why}.",
            f"When you {v} the {n1}, the {n2} is updated in the same step, {why}.",
            f"{r.choice(OPENERS)} {who} {v} the {n1} first and look at the {n2} afterwards.",
            f"{r.choice(LINKERS)} {article(adj + ' ' + n1)} may need its own {n2} once the load grows.",
            f"The {n1} keeps a record of every {n2} it has seen, {why}.",
            f"You can {v} {plural(n1)} from the command line or from Python, and both paths share one {n2}.",
            f"{who.capitalize()} who run {article(adj)} installation rarely need to {v} the {n2} by hand.",
            f"Each {n1} belongs to exactly one {n2}, and {PROJECT} checks this before it accepts a change.",
            f"If the {n1} looks wrong, {v} it again with the verbose flag and read what the {n2} reports.",
            f"It is safe to {v} {article(n1)} while workers are running; the {n2} simply waits for its turn.",
            f"{r.choice(OPENERS)} the {adj} {n1} is enough, and the {n2} only matters for larger setups.",
            f"We recommend that {who} {v} the {n1} in a test environment before they change the {n2}.",
        ]
        return r.choice(forms)

    def paragraph(self, lo: int = 3, hi: int = 6) -> str:
        sents = [self.sentence() for _ in range(self.rng.randint(lo, hi))]
        if self.facts and self.rng.random() < 0.7:
            sents.insert(self.rng.randint(0, len(sents)), self.facts.pop())
        return " ".join(sents)


# ---------------------------------------------------------------------------------------------------------
# page parts


def ident(rng: random.Random, words: list[str]) -> str:
    return "_".join(rng.sample(words, 2)).replace(" ", "_")


def code_block(rng: random.Random, topic: str) -> str:
    nouns = [n.replace(" ", "_") for n in TOPICS[topic]["nouns"]]
    fn = ident(rng, nouns)
    queue = rng.choice(["emails", "reports", "thumbnails", "invoices", "exports", "webhooks"])
    n = rng.randint(2, 9)
    variants = [
        f"""import kestrel

app = kestrel.App("{queue}")


@app.job(retries={n}, timeout={n * 30})
def {fn}(item_id: int) -> None:
    record = load(item_id)
    record.process()
    record.save()


{fn}.enqueue(item_id=42, priority="{rng.choice(["high", "normal", "low"])}")""",
        f"""$ kestrel queue create {queue} --priority {rng.choice(["high", "normal"])}
$ kestrel worker start --queue {queue} --concurrency {n}
$ kestrel job list --queue {queue} --state failed --limit {n * 10}""",
        f"""# kestrel.toml
[queue.{queue}]
retries = {n}
backoff_seconds = {n * 5}
keep_finished_days = {rng.choice([3, 7, 14])}

[worker]
concurrency = {n}
heartbeat_seconds = {rng.choice([5, 10, 15])}""",
        f"""from kestrel.testing import run_now


def test_{fn}() -> None:
    result = run_now({fn}, item_id={n})
    assert result.state == "finished"
    assert result.attempts == 1""",
    ]
    return "<pre><code>" + html.escape(rng.choice(variants)) + "</code></pre>"


def option_table(rng: random.Random, topic: str) -> str:
    nouns = TOPICS[topic]["nouns"]
    rows = []
    for noun in rng.sample(nouns, 4):
        name = noun.replace(" ", "_") + "_" + rng.choice(["limit", "seconds", "size", "mode", "count"])
        default = rng.choice(["10", "30", "off", "on", "auto", "100", "5"])
        desc = f"How {PROJECT} treats the {noun} {rng.choice(['by default', 'under load', 'on restart'])}."
        rows.append(f"<tr><td><code>{name}</code></td><td>{default}</td><td>{desc}</td></tr>")
    return (
        "<table><thead><tr><th>Setting</th><th>Default</th><th>Meaning</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


NAV = [
    ("/", "Home"),
    ("/guide/", "Guide"),
    ("/reference/", "Reference"),
    ("/tutorials/", "Tutorials"),
    ("/releases/", "Releases"),
    ("/faq.html", "FAQ"),
]
FOOTER = [
    ("/about/team.html", "Team"),
    ("/tags/", "Tags"),
    ("/community/deals.html", "Partners"),
    ("/downloads/cheatsheet.txt", "Cheat sheet"),
    ("https://example.org/kestrel/source", "Source code"),
]


def html_page(title: str, body: str, crumbs: list[tuple[str, str]] = ()) -> str:  # type: ignore[assignment]
    nav = " | ".join(f'<a href="{h}">{t}</a>' for h, t in NAV)
    foot = " · ".join(f'<a href="{h}">{t}</a>' for h, t in FOOTER)
    trail = " › ".join(f'<a href="{h}">{t}</a>' for h, t in crumbs)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)} — {PROJECT} documentation</title>\n</head>\n<body>\n"
        f'<header><nav class="site-nav">{nav}</nav></header>\n'
        + (f'<div class="breadcrumbs">{trail}</div>\n' if trail else "")
        + f"<main>\n<article>\n<h1>{html.escape(title)}</h1>\n{body}\n</article>\n</main>\n"
        f"<footer><p>{foot}</p><p>© 2026 The {PROJECT} authors. Built with a static site generator.</p>"
        "<p>This site uses no cookies.</p></footer>\n</body>\n</html>\n"
    )


def doc_body(rng: random.Random, topic: str, sections: int, code: bool, table: bool, links: list[str]) -> str:
    w = Writer(rng, topic)
    parts = [f"<p>{w.paragraph(2, 4)}</p>"]
    for i in range(sections):
        heading = rng.choice(TOPICS[topic]["nouns"]).capitalize()
        heading = f"{rng.choice(['Working with', 'About', 'Choosing', 'Changing', 'Checking'])} the {heading.lower()}"
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(f"<p>{w.paragraph()}</p>")
        if code and i == 0:
            parts.append(code_block(rng, topic))
        if table and i == sections - 1:
            parts.append(option_table(rng, topic))
        if rng.random() < 0.4:
            items = "".join(f"<li>{w.sentence()}</li>" for _ in range(3))
            parts.append(f"<ul>{items}</ul>")
    if links:
        parts.append(
            "<h2>See also</h2><ul>" + "".join(f'<li><a href="{h}">{t}</a></li>' for h, t in links) + "</ul>"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# the site


GUIDE = [
    ("install", "Installing Kestrel", "deployment"),
    ("first-queue", "Your first queue", "queues"),
    ("configuration", "Configuration files and variables", "deployment"),
    ("workers", "Running workers", "workers"),
    ("priorities", "Priorities and fairness", "queues"),
    ("retries", "Retries and failures", "retries"),
    ("scheduling", "Scheduling jobs for later", "scheduling"),
    ("storage", "Where jobs are stored", "storage"),
    ("monitoring", "Watching a running system", "monitoring"),
    ("security", "Signing payloads and access control", "security"),
    ("upgrading", "Upgrading between versions", "storage"),
]
COMMANDS = [
    ("queue-create", "kestrel queue create", "queues"),
    ("queue-pause", "kestrel queue pause", "queues"),
    ("worker-start", "kestrel worker start", "workers"),
    ("worker-stop", "kestrel worker stop", "workers"),
    ("job-list", "kestrel job list", "retries"),
    ("job-retry", "kestrel job retry", "retries"),
    ("schedule-add", "kestrel schedule add", "scheduling"),
    ("db-migrate", "kestrel db migrate", "storage"),
    ("metrics-export", "kestrel metrics export", "monitoring"),
    ("token-rotate", "kestrel token rotate", "security"),
]
SETTINGS = [
    ("settings-queue", "Queue settings", "queues"),
    ("settings-worker", "Worker settings", "workers"),
    ("settings-retry", "Retry settings", "retries"),
    ("settings-storage", "Storage settings", "storage"),
    ("settings-security", "Security settings", "security"),
]
TUTORIALS = [
    ("thumbnails", "Making image thumbnails in the background", "workers"),
    ("emails", "Sending e-mail without blocking requests", "queues"),
    ("nightly-reports", "A nightly report with the scheduler", "scheduling"),
    ("webhooks", "Delivering webhooks reliably", "retries"),
    ("docker", "Running Kestrel in containers", "deployment"),
    ("grafana", "A dashboard for queue latency", "monitoring"),
    ("testing", "Testing jobs without a worker", "workers"),
]
RELEASES = ["1.0.0", "1.1.0", "1.2.0", "1.2.1", "1.3.0"]


def release_notes(rng: random.Random, version: str) -> str:
    w = Writer(rng, rng.choice(list(TOPICS)))
    items = []
    for topic in rng.sample(list(TOPICS), 4):
        noun = rng.choice(TOPICS[topic]["nouns"])
        items.append(
            f"<li>{rng.choice(['New:', 'Fixed:', 'Changed:'])} the {noun} "
            f"{rng.choice(['is faster on large queues', 'no longer blocks a restart', 'reports its state in the dashboard', 'keeps its order after a retry', 'can be set per queue'])}. "
            f"{w.sentence()}</li>"
        )
    return f"<p>Version {version} of {PROJECT}. {w.paragraph(3, 5)}</p><ul>{''.join(items)}</ul><p>{w.paragraph(2, 3)}</p>"


def near_copy(rng: random.Random, body: str, version: str, previous: str) -> str:
    """The previous release's notes with the version changed and a few words swapped: a near duplicate."""
    out = body.replace(previous, version)
    swaps = [("faster", "quicker"), ("restart", "reboot"), ("queue", "queue"), ("dashboard", "web dashboard")]
    for a, b in rng.sample(swaps, 2):
        out = out.replace(a, b, 1)
    return out + f"<p>This patch release only fixes a packaging mistake in {previous}.</p>"


def spam_page() -> str:
    words = [
        "cheap",
        "kestrel",
        "hosting",
        "best",
        "price",
        "deal",
        "discount",
        "buy",
        "now",
        "free",
        "trial",
        "limited",
        "offer",
    ]
    lines = []
    for i in range(30):
        lines.append(" ".join(words[(i + j) % len(words)] for j in range(12)) + " !!!")
    body = "<p>" + "<br>\n".join(lines) + "</p>"
    return html_page("Best Kestrel hosting deals", body)


def tags_page() -> str:
    tags = sorted({n for t in TOPICS.values() for n in t["nouns"]})
    body = '<ul class="tags">' + "".join(
        f'<li><a href="/tags/#{t.replace(" ", "-")}">{t}</a></li>' for t in tags
    )
    return html_page("Tags", body + "</ul>")


def team_page(rng: random.Random) -> str:
    w = Writer(rng, "deployment")
    people = [
        ("Maria Lopez", "maintainer", "maria.lopez@example.org", "+44 20 7946 0321"),
        ("Tomasz Nowak", "release manager", "t.nowak@example.org", "+44 20 7946 0874"),
        ("Aiko Tanaka", "documentation", "aiko@mail.example.net", "(202) 555-0143"),
    ]
    rows = "".join(
        f"<li><strong>{n}</strong>, {role}: write to {mail} or call {phone} during office hours.</li>"
        for n, role, mail, phone in people
    )
    body = (
        f"<p>{PROJECT} is maintained by a small group of volunteers. {w.paragraph(3, 4)}</p>"
        f"<h2>Contact</h2><ul>{rows}</ul>"
        f"<p>Security reports go to security@example.org, never to the public tracker. {w.paragraph(2, 3)}</p>"
    )
    return html_page("The team", body, [("/", "Home")])


def leaked_key_page(rng: random.Random) -> str:
    w = Writer(rng, "security")
    config = (
        '[storage]\nurl = "postgres://kestrel@db.internal/jobs"\n\n[cloud]\n'
        'aws_access_key_id = AKIA4KESTRELDEMO7Q2Z\nregion = "eu-west-1"'
    )
    body = (
        f"<p>Posted in the community forum: my workers stop after an hour. {w.paragraph(3, 4)}</p>"
        f"<p>Here is my whole configuration file, in case it helps:</p><pre><code>{html.escape(config)}</code></pre>"
        f"<p>{w.paragraph(2, 4)}</p>"
    )
    return html_page("Forum: workers stop after an hour", body, [("/", "Home")])


def build(out: Path, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    pages: dict[str, str] = {}

    def crumbs(section: str, label: str) -> list[tuple[str, str]]:
        return [("/", "Home"), (f"/{section}/", label)]

    # user guide
    guide_links = [(f"/guide/{slug}.html", title) for slug, title, _ in GUIDE]
    for i, (slug, title, topic) in enumerate(GUIDE):
        see = [guide_links[(i + 1) % len(GUIDE)], guide_links[(i + 3) % len(GUIDE)]]
        if slug == "install":
            see.append(("/guide/old-setup.html", "Older setup notes"))  # a broken link: 404
        body = doc_body(
            rng, topic, rng.randint(2, 4), code=rng.random() < 0.7, table=rng.random() < 0.4, links=see
        )
        pages[f"guide/{slug}.html"] = html_page(title, body, crumbs("guide", "Guide"))
    pages["guide/index.html"] = html_page(
        "User guide",
        f"<p>{Writer(rng, 'queues').paragraph(2, 3)}</p><ul>"
        + "".join(f'<li><a href="{h}">{t}</a></li>' for h, t in guide_links)
        + "</ul>",
        [("/", "Home")],
    )
    # the install guide's old address still serves the same page: an exact duplicate for the data stage
    pages["install.html"] = pages["guide/install.html"]

    # reference: commands and settings
    ref_links = []
    for slug, command, topic in COMMANDS:
        w = Writer(rng, topic)
        body = (
            f"<p><code>{command}</code> — {w.sentence()}</p><p>{w.paragraph(2, 4)}</p>"
            f"<h2>Options</h2>{option_table(rng, topic)}<h2>Example</h2>{code_block(rng, topic)}"
            f"<p>{w.paragraph(1, 3)}</p>"
        )
        pages[f"reference/{slug}.html"] = html_page(command, body, crumbs("reference", "Reference"))
        ref_links.append((f"/reference/{slug}.html", command))
    for slug, title, topic in SETTINGS:
        body = doc_body(rng, topic, 2, code=True, table=True, links=[])
        pages[f"reference/{slug}.html"] = html_page(title, body, crumbs("reference", "Reference"))
        ref_links.append((f"/reference/{slug}.html", title))
    pages["reference/index.html"] = html_page(
        "Reference",
        f"<p>{Writer(rng, 'workers').paragraph(2, 3)}</p><ul>"
        + "".join(f'<li><a href="{h}">{t}</a></li>' for h, t in ref_links)
        + "</ul>",
        [("/", "Home")],
    )

    # tutorials
    tut_links = [(f"/tutorials/{slug}.html", title) for slug, title, _ in TUTORIALS]
    for slug, title, topic in TUTORIALS:
        body = doc_body(
            rng, topic, rng.randint(3, 4), code=True, table=False, links=[rng.choice(guide_links)]
        )
        pages[f"tutorials/{slug}.html"] = html_page(title, body, crumbs("tutorials", "Tutorials"))
    pages["tutorials/index.html"] = html_page(
        "Tutorials",
        f"<p>{Writer(rng, 'scheduling').paragraph(2, 3)}</p><ul>"
        + "".join(f'<li><a href="{h}">{t}</a></li>' for h, t in tut_links)
        + '</ul><p>Tutorials need the <a href="https://example.org/kestrel/examples">example project</a>.</p>',
        [("/", "Home")],
    )

    # release notes; 1.2.1 is a near copy of 1.2.0; drafts/ is disallowed by robots.txt
    notes: dict[str, str] = {}
    for version in RELEASES:
        if version == "1.2.1":
            notes[version] = near_copy(rng, notes["1.2.0"], version, "1.2.0")
        else:
            notes[version] = release_notes(rng, version)
        pages[f"releases/{version}.html"] = html_page(
            f"{PROJECT} {version}", notes[version], crumbs("releases", "Releases")
        )
    pages["releases/index.html"] = html_page(
        "Release notes",
        f"<p>{Writer(rng, 'storage').paragraph(2, 3)}</p><ul>"
        + "".join(f'<li><a href="/releases/{v}.html">{PROJECT} {v}</a></li>' for v in reversed(RELEASES))
        + '<li><a href="/drafts/1.4.0.html">Upcoming: 1.4.0 (draft)</a></li></ul>',
        [("/", "Home")],
    )
    for slug in ("1.4.0", "roadmap"):
        pages[f"drafts/{slug}.html"] = html_page(
            f"Draft: {slug}", f"<p>{Writer(rng, 'deployment').paragraph(4, 6)}</p>", [("/", "Home")]
        )

    # FAQ
    faq = []
    for topic in rng.sample(list(TOPICS), 6):
        w = Writer(rng, topic)
        noun = rng.choice(TOPICS[topic]["nouns"])
        faq.append(f"<h2>What happens to the {noun} when a worker crashes?</h2><p>{w.paragraph(2, 4)}</p>")
    pages["faq.html"] = html_page("Frequently asked questions", "\n".join(faq), [("/", "Home")])

    # pages to drop, scrub or skip
    pages["about/team.html"] = team_page(rng)
    pages["community/deals.html"] = spam_page()
    pages["community/workers-stop.html"] = leaked_key_page(rng)
    pages["tags/index.html"] = tags_page()

    # home page: links into every section ("/guide" without its slash is answered with a redirect)
    intro = Writer(rng, "queues")
    pages["index.html"] = html_page(
        f"{PROJECT}: background jobs for Python",
        f"<p>{intro.paragraph(3, 5)}</p><p>{intro.paragraph(2, 4)}</p>"
        '<ul><li><a href="/guide">Read the user guide</a></li>'
        '<li><a href="/reference/">Command and settings reference</a></li>'
        '<li><a href="/tutorials/">Tutorials</a></li>'
        '<li><a href="/releases/">Release notes</a></li>'
        '<li><a href="/community/workers-stop.html">From the forum: workers stop after an hour</a></li>'
        '<li><a href="/install.html">Installation (old address)</a></li></ul>',
    )

    robots = "# Drafts are not published yet.\nUser-agent: *\nDisallow: /drafts/\n"
    cheatsheet = (
        "kestrel queue create NAME\nkestrel worker start --queue NAME\nkestrel job list --state failed\n"
    )

    if out.exists():
        shutil.rmtree(out)
    for rel, text in sorted(pages.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    (out / "robots.txt").write_text(robots, encoding="utf-8", newline="\n")
    (out / "downloads").mkdir(exist_ok=True)
    (out / "downloads" / "cheatsheet.txt").write_text(cheatsheet, encoding="utf-8", newline="\n")
    return {"pages": len(pages), "bytes": sum(len(t.encode()) for t in pages.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    stats = build(args.out, args.seed)
    print(f"wrote {stats['pages']} pages ({stats['bytes']:,} bytes) to {args.out}")


if __name__ == "__main__":
    main()

"""The labelling web server: its API, the files it will and will not serve, concurrent
annotators over HTTP, and the page itself driven by keyboard in headless Chromium."""

import json
import os
import shutil
import sqlite3
import threading
import urllib.error
import urllib.request

import pytest
import torch

from genalign import label_server, labelling
from genalign.preference_store import PreferenceStore, Sample, sample_digests


@pytest.fixture
def labels(tmp_path):
    """A labels folder with one round: 2 prompts × 3 images (solid colours), 6 pairs."""
    root = tmp_path / "labels"
    (root / "round-001").mkdir(parents=True)
    images = torch.linspace(0, 1, 6).view(6, 1, 1, 1).expand(6, 3, 8, 8)  # [6, 3, 8, 8]
    samples, pairs = [], []
    for p, prompt in enumerate(["a red circle", "two blue squares"]):
        ids = [f"s0-e1-r{p * 3 + j}" for j in range(3)]
        for i in ids:
            row = int(i.rsplit("r", 1)[1])
            labelling.save_output(images[row], str(root / "round-001" / f"{i}.png"))
            samples.append(Sample(i, 0, prompt, prompt, "image", sample_digests(images[row : row + 1])[0], f"round-001/{i}.png"))
        pairs += [(prompt, a, b) for x, a in enumerate(ids) for b in ids[x + 1 :]]
    (tmp_path / "secret.txt").write_text("not for the web")
    store = PreferenceStore(str(root / "labels.sqlite"), create=True)
    store.add_round(1, samples, pairs)
    store.close()
    return root


@pytest.fixture
def server(labels):
    srv, thread = label_server.start(str(labels))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def request(srv, path, body=None, method=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def api(srv, path, body=None):
    status, data, _ = request(srv, path, body)
    assert status == 200, data
    return json.loads(data)


def test_answers_map_left_and_right_to_the_samples_shown(server, labels):
    state = api(server, "/api/state?annotator=ann")
    assert (state["round"], state["done"], state["total"]) == (1, 0, 6)
    c = state["comparison"]
    assert c["prompt"] == "a red circle" and c["left"]["kind"] == "image"
    shown_left = c["left"]["url"].rsplit("/", 1)[1].removesuffix(".png")
    state = api(server, "/api/answer", {"annotator": "ann", "id": c["id"], "choice": "left"})
    assert state["recorded"] and state["done"] == 1 and state["comparison"]["id"] != c["id"]
    store = PreferenceStore(str(labels / "labels.sqlite"))
    other = ({"s0-e1-r0", "s0-e1-r1"} - {shown_left}).pop()
    assert store.label("a red circle", shown_left, other) == 1, "the sample shown on the left won"
    # Repeating the request (a double key press) writes nothing.
    again = api(server, "/api/answer", {"annotator": "ann", "id": c["id"], "choice": "right"})
    assert not again["recorded"] and len(store) == 1
    undone = api(server, "/api/undo", {"annotator": "ann"})
    assert undone["undone"]["id"] == c["id"] and undone["comparison"]["id"] == c["id"] and len(store) == 0
    # The left/right order is fixed per (annotator, comparison) and differs across annotators somewhere.
    assert any(label_server.swapped("ann", i) != label_server.swapped("bob", i) for i in range(1, 7))
    assert api(server, "/api/state?annotator=ann")["comparison"]["left"] == c["left"]


def test_bad_requests_get_4xx(server):
    cases = [
        ("/api/state", None, 400),  # no annotator
        ("/api/state?annotator=" + "x" * 65, None, 400),
        ("/api/answer", {"annotator": "ann", "id": "1; DROP TABLE queue", "choice": "left"}, 400),
        ("/api/answer", {"annotator": "ann", "id": 99, "choice": "left"}, 404),
        ("/api/answer", {"annotator": "ann", "id": 1, "choice": "middle"}, 400),
        ("/api/answer", {"annotator": "", "id": 1, "choice": "left"}, 400),
        ("/api/answer", {"annotator": "a\nb", "id": 1, "choice": "left"}, 400),
        ("/api/answer", [1, 2], 400),
        ("/api/nothing", {"annotator": "ann"}, 404),
        ("/nothing", None, 404),
        ("/api/stats?round=last", None, 400),
    ]
    for path, body, expected in cases:
        status, data, kind = request(server, path, body)
        assert status == expected, (path, body, status, data)
        assert kind == "application/json" and "error" in json.loads(data)
    status, _, _ = request(server, "/api/answer", raw=b"{not json")
    assert status == 400
    status, _, _ = request(server, "/api/answer", raw=b"x" * (label_server.MAX_BODY + 1))
    assert status == 413
    assert len(PreferenceStore(str(server.store_path))) == 0, "no bad request wrote anything"


def test_only_round_images_are_served(server, labels, tmp_path):
    status, body, kind = request(server, "/files/round-001/s0-e1-r0.png")
    assert status == 200 and kind == "image/png" and body[:4] == b"\x89PNG"
    os.symlink(tmp_path / "secret.txt", labels / "round-001" / "link.png")  # a link out of the folder
    shutil.copy(labels / "labels.sqlite", labels / "round-001" / "copy.sqlite")
    for path in ["/files/../secret.txt", "/files/round-001/../../secret.txt", "/files/round-001/..%2F..%2Fsecret.txt",
                 "/files/%2e%2e/secret.txt", "/files/labels.sqlite", "/files/round-001/copy.sqlite",
                 "/files//etc/passwd", "/files/round-001/link.png", "/files/round-001/%00.png"]:
        status, body, _ = request(server, path)
        assert status in (403, 404), path
        assert b"not for the web" not in body and b"SQLite" not in body
    assert request(server, "/files/round-001/missing.png")[0] == 404


def test_the_page_needs_no_network(server):
    status, body, kind = request(server, "/")
    assert status == 200 and kind.startswith("text/html")
    page = body.decode()
    assert "<script>" in page and "src=\"http" not in page and "href=\"http" not in page and "@import" not in page


def test_concurrent_annotators_over_http(server, labels):
    errors = []

    def annotate(name):
        try:
            while (c := api(server, f"/api/state?annotator={name}")["comparison"]) is not None:
                api(server, "/api/answer", {"annotator": name, "id": c["id"], "choice": "left"})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with sqlite3.connect(labels / "labels.sqlite") as c:
        assert c.execute("SELECT annotator, COUNT(*) FROM comparisons GROUP BY annotator").fetchall() == [
            (f"ann{i}", 6) for i in range(6)]
    stats = api(server, "/api/stats?round=1")
    assert len(stats) == 1 and stats[0]["labelled"] == 6 and len(stats[0]["annotators"]) == 6
    assert api(server, "/api/stats?round=2") == [] and api(server, "/api/stats") == stats


def test_non_loopback_hosts_are_told_apart():
    assert label_server.is_loopback("127.0.0.1") and label_server.is_loopback("localhost") and label_server.is_loopback("::1")
    assert not label_server.is_loopback("0.0.0.0") and not label_server.is_loopback("192.168.1.4")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_labelling_by_keyboard_in_headless_chromium(server, labels, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto(server.url)
        page.fill("#name", "keyboard")
        page.press("#name", "Enter")
        progress = page.locator("#progress")
        sync_api.expect(progress).to_have_text("0 / 6")
        sync_api.expect(page.locator("#left img")).to_have_count(1)
        shown = []
        for key, done in [("ArrowLeft", 1), ("ArrowRight", 2), ("t", 3), ("s", 4), ("ArrowLeft", 5)]:
            c = api(server, "/api/state?annotator=keyboard")["comparison"]
            shown.append((c["id"], c["left"]["url"], c["right"]["url"]))
            page.keyboard.press(key)
            sync_api.expect(progress).to_have_text(f"{done} / 6")
        page.keyboard.press("u")  # undo the last (ArrowLeft on the fifth pair)
        sync_api.expect(progress).to_have_text("4 / 6")
        sync_api.expect(page.locator("#message")).to_have_text("undone")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000
    with sqlite3.connect(labels / "labels.sqlite") as c:
        rows = c.execute("SELECT queue_id, sample_a, sample_b, chosen FROM comparisons WHERE annotator = 'keyboard' "
                         "ORDER BY id").fetchall()
        skipped = c.execute("SELECT queue_id FROM journal WHERE annotator = 'keyboard' AND action = 'skip'").fetchall()
    assert [r[0] for r in rows] == [shown[0][0], shown[1][0], shown[2][0]] and skipped == [(shown[3][0],)]

    def sample_at(url):  # the id of the sample whose file is at that URL
        return url.rsplit("/", 1)[1].removesuffix(".png")

    chosen1 = rows[0][1] if rows[0][3] == "a" else rows[0][2]
    chosen2 = rows[1][1] if rows[1][3] == "a" else rows[1][2]
    assert chosen1 == sample_at(shown[0][1]), "ArrowLeft chose the sample shown on the left"
    assert chosen2 == sample_at(shown[1][2]), "ArrowRight chose the sample shown on the right"
    assert rows[2][3] == "tie"

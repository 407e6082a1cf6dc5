"""Screenshots of the web page (chat, arena after a vote, annotate) into docs/screenshots/, for the README.

    python docs/screenshots.py                                     # the models `make demo` trains
    python docs/screenshots.py sft=runs/demo/sft/model dpo=runs/demo/dpo/model --out docs/screenshots

Serves the models with the real server (`create_app`, a fresh vote database in a temporary folder) on a free port
of 127.0.0.1 and drives headless Chromium (Playwright with the system's chromium) through each page. Before the
arena's shot, --votes rounds are voted by the demo world's simulated annotator through the same routes the page uses
(so the leaderboard has something to show); the round in the picture is voted in the browser.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me a story about Tom.", "Write a short story about a dog in the garden.",
           "Write a happy story about a girl named Mia at the lake.", "Tell me a story about a cat on the patio.",
           "Write a long story about a boy named Sam in the forest.", "Write a sad story about a duck at the pond.",
           "Tell me a story about a rabbit in the meadow.", "Write a story about an owl in the barn."]


def annotator_votes(base: str, rounds: int) -> None:
    """`rounds` arena rounds voted by the demo world's simulated annotator, through the page's routes."""
    import json

    from tristage.world.annotator import Annotator

    judge = Annotator(temperature=0.1, seed=0)
    with httpx.Client(base_url=base, timeout=120) as c:
        for i in range(rounds):
            prompt = PROMPTS[i % len(PROMPTS)]
            bid = c.post("/web/arena/new", json={"messages": prompt}).json()["battle"]
            answers = []
            for side in "ab":
                lines = c.post(f"/web/arena/{bid}/answer/{side}", json={"seed": i}).text.splitlines()
                answers.append("".join(json.loads(x).get("delta", "") for x in lines))
            j = judge.compare(prompt, answers[0].strip(), answers[1].strip())
            winner = "tie" if answers[0].strip() == answers[1].strip() else "model_a" if j.a_preferred else "model_b"
            c.post(f"/web/arena/{bid}/vote", json={"winner": winner}).raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["sft=runs/demo/sft/model", "dpo=runs/demo/dpo/model",
                                                  "dpo2=runs/demo/dpo_round2/model"],
                    help="model folders, PATH or NAME=PATH (default: what `make demo` writes)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--votes", type=int, default=40, help="arena rounds the simulated annotator votes first")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("screenshots: no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    from tristage.serve.hub import Hub
    from tristage.serve.server import create_app, serve_in_thread

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hub = Hub.load(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        base, stop = serve_in_thread(create_app(hub, db=str(Path(tmp) / "votes.db")))
        try:
            annotator_votes(base, args.votes)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
                page.set_default_timeout(120_000)

                page.goto(base + "/chat")
                page.select_option("#model", hub.names[-1])
                for text in ("Write a short story about a dog in the garden.", "Tell me a story about Tom."):
                    page.fill("#prompt", text)
                    page.press("#prompt", "Enter")
                    page.wait_for_selector(f".msg.assistant.done >> nth={page.locator('.msg.assistant').count() - 1}")
                page.screenshot(path=str(out / "chat.png"), full_page=True)

                page.goto(base + "/arena")
                page.fill("#prompt", "Write a happy story about a girl named Mia at the lake.")
                page.click("#go")
                page.wait_for_selector("#vote button:not([disabled])")
                page.click("#vote button[data-winner=model_a]")
                page.wait_for_selector("#board-wrap:not([hidden]) table.board")
                page.screenshot(path=str(out / "arena.png"), full_page=True)

                page.goto(base + "/annotate")
                page.fill("#prompt", "Tell me a story about a cat on the patio.")
                for box in page.locator("#models input").all()[2:]:
                    box.uncheck()
                page.click("#ask")
                expect(page.locator("#status")).to_have_text("All answers are in.")
                page.select_option("#attr-set", "world")
                attrs = page.locator("#answers .card").first.locator("th").all_text_contents()
                for i in range(2):
                    for k, attr in enumerate(attrs):
                        page.check(f'input[name="r-{i}-{attr.replace(" ", "_")}"][value="{5 - (i + k) % 3}"]')
                page.check('input[name=best][value="0"]')
                page.fill("#rationale", "The first one keeps to the cat and the patio and has a proper ending.")
                page.screenshot(path=str(out / "annotate.png"), full_page=True)
                browser.close()
        finally:
            stop()
            hub.close()
    for name in ("chat", "arena", "annotate"):
        print(f"screenshots: wrote {out / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

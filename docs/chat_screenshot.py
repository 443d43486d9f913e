"""Render docs/chat.svg and docs/chat.png: `flashlm chat` mid-conversation on the default model
in the flash layout under a memory budget, so the footer shows every figure it has.

    python docs/chat_screenshot.py

The SVG is textual's own; the PNG is drawn from the same screen, cell by cell, with Pillow.
"""

import asyncio
import io
import time
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.segment import ControlType

from flashlm.apps.chat import ChatApp, Prompt
from flashlm.runtime.convert import cached

DOCS = Path(__file__).resolve().parent


async def _turn(pilot, app, text):
    box = app.query_one(Prompt)
    box.text = text
    box.move_cursor(box.document.end)
    await pilot.press("enter")
    t0 = time.monotonic()
    await pilot.pause(0.2)
    while app.generating or len(app.messages) % 2:
        assert time.monotonic() - t0 < 120, "the reply did not finish"
        await pilot.pause(0.1)


async def main():
    flash = cached("smollm2-135m")
    app = ChatApp(str(flash), n_ctx=1024, memory_budget="250MB", temperature=0, max_tokens=120)
    async with app.run_test(size=(100, 34)) as pilot:
        while app.model is None:
            await pilot.pause(0.1)
        await _turn(pilot, app, "What is the capital of France?")
        await _turn(pilot, app, "Show me a Python function that reverses a string.")
        app.save_screenshot("chat.svg", str(DOCS))
        _png(app, DOCS / "chat.png")


def _png(app, path: Path) -> None:
    """Draw the app's screen as textual renders it for its SVG: each cell's background, then its glyph."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, simplify=True))
    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    regular = ImageFont.truetype(str(fonts / "DejaVuSansMono.ttf"), 15)
    bold = ImageFont.truetype(str(fonts / "DejaVuSansMono-Bold.ttf"), 15)
    cw, ch = round(regular.getlength("M")), 19
    img = Image.new("RGB", (width * cw, height * ch), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    x = y = 0
    for seg in console._record_buffer:
        if seg.control:  # the compositor places each line with a cursor move
            for code in seg.control:
                if code[0] == ControlType.CURSOR_MOVE_TO:
                    x, y = code[1], code[2]
            continue
        style = seg.style
        fg = style.color.get_truecolor() if style and style.color else (224, 224, 224)
        bg = style.bgcolor.get_truecolor() if style and style.bgcolor else (0, 0, 0)
        if style and style.reverse:
            fg, bg = bg, fg
        for c in seg.text:
            if c == "\n":
                x, y = 0, y + 1
                continue
            draw.rectangle([x * cw, y * ch, (x + 1) * cw - 1, (y + 1) * ch - 1], fill=tuple(bg))
            if c != " ":
                draw.text((x * cw, y * ch + 1), c, font=bold if style and style.bold else regular, fill=tuple(fg))
            x += 1
    img.save(path)


if __name__ == "__main__":
    asyncio.run(main())

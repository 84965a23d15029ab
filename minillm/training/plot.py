"""A dependency-free PNG line chart: numpy draws the pixels, zlib + struct write the file (PNG spec:
https://www.w3.org/TR/png/). Used for the training curves in docs/; matplotlib is not a dependency.

    line_chart("loss.png", [("train", steps, losses), ("val", val_steps, val_losses)], title="loss")

A PNG is the 8-byte signature, then chunks `length (uint32 BE) | type | data | crc32(type + data)`:
IHDR (width, height, bit depth 8, colour type 2 = RGB), one IDAT holding the zlib-compressed rows,
each row prefixed by its filter byte (0 = none), and an empty IEND. Text uses a 3x5 pixel font,
scaled up.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# each glyph is 5 rows of 3 pixels, one octal digit per row (top first): "0" = 111 101 101 101 111
FONT = dict(zip("0123456789.-ABCDEFGHIJKLMNOPQRSTUVWXYZ/()_=,: ", [
    0o75557, 0o26227, 0o71747, 0o71717, 0o55711, 0o74717, 0o74757, 0o71122, 0o75757, 0o75717,
    0o00002, 0o00700, 0o25755, 0o65656, 0o34443, 0o65556, 0o74647, 0o74644, 0o34553, 0o55755,
    0o72227, 0o11152, 0o56465, 0o44447, 0o57755, 0o57775, 0o25552, 0o65644, 0o25563, 0o65655,
    0o34216, 0o72222, 0o55557, 0o55552, 0o55775, 0o55255, 0o55222, 0o71247, 0o11244, 0o24442,
    0o21112, 0o00007, 0o07070, 0o00024, 0o02020, 0], strict=True))
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def draw_text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(0, 0, 0)):
    """Write `text` (upper-cased; unknown characters print as blanks) with its top-left corner at
    (x, y)."""
    for i, ch in enumerate(text.upper()):
        bits = FONT.get(ch, 0)
        for r in range(5):
            for c in range(3):
                if bits >> (3 * (4 - r) + (2 - c)) & 1:
                    x0, y0 = x + (4 * i + c) * scale, y + r * scale
                    img[y0:y0 + scale, x0:x0 + scale] = color


def draw_line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2  # enough samples that consecutive ones touch
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    for d in range(width):
        img[np.clip(ys + d, 0, img.shape[0] - 1), np.clip(xs, 0, img.shape[1] - 1)] = color


def encode_png(img: np.ndarray) -> bytes:
    """img (H, W, 3) uint8 → PNG bytes."""
    h, w, _ = img.shape
    # filter byte 0
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    # width, height, 8 bits, RGB, deflate, filter, no interlace
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def line_chart(path, series: list[tuple[str, list, list]], title: str = "", xlabel: str = "step",
               width: int = 720, height: int = 420) -> None:
    """Plot each (label, xs, ys) as a coloured line (with dots if it has ≤ 30 points) and write a
    PNG."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 90, width - 20, 40, height - 50
    xs_all = np.concatenate([np.asarray(s[1], float) for s in series])
    ys_all = np.concatenate([np.asarray(s[2], float) for s in series])
    x_lo, x_hi = xs_all.min(), max(xs_all.max(), xs_all.min() + 1e-12)
    pad = 0.05 * (ys_all.max() - ys_all.min() or abs(ys_all.max()) or 1.0)
    y_lo, y_hi = ys_all.min() - pad, ys_all.max() + pad
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (right - left)
    py = lambda y: bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
    for i in range(5):  # grid lines and tick labels
        yv, xv = y_lo + (y_hi - y_lo) * i / 4, x_lo + (x_hi - x_lo) * i / 4
        img[int(py(yv)), left:right] = (225, 225, 225)
        img[top:bottom, int(px(xv))] = (225, 225, 225)
        draw_text(img, 8, int(py(yv)) - 5, f"{yv:.3g}")
        draw_text(img, int(px(xv)) - 10, bottom + 8, f"{xv:.4g}")
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = (0, 0, 0)  # axes
    draw_text(img, left, 12, title, scale=3)
    draw_text(img, (left + right) // 2 - 12, height - 20, xlabel)
    for k, (label, xs, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            draw_line(img, xa, ya, xb, yb, color)
        if len(pts) <= 30:
            for x, y in pts:
                img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] = color
        ly = top + 10 + 18 * k  # legend, top right
        img[ly:ly + 10, right - 150:right - 130] = color
        draw_text(img, right - 124, ly, label)
    with open(path, "wb") as f:
        f.write(encode_png(img))

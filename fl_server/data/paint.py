"""How the synthetic fleet paints one object of each class, and the colour helpers it uses.

``synth`` decides where objects go and how the light and weather look; this draws what is in
each box (a car with its windows and wheels, a pedestrian, a cyclist, a sign), so that a tiny
YOLO has shapes, not flat rectangles, to learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, end exclusive


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform float; ``Generator.uniform`` is several times slower for scalars."""
    return low + (high - low) * rng.random()


def color(rng: np.random.Generator, base: Sequence[int], jitter: int) -> tuple[int, int, int]:
    """A BGR colour near ``base``; plain ints because cv2 drawing wants them."""
    span = 2 * jitter + 1
    b, g, r = (
        min(255, max(0, c + int(u * span) - jitter))
        for c, u in zip(base, rng.random(3).tolist(), strict=True)
    )
    return b, g, r


def vivid(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated random colour (cars, clothes): hue varies, never grey."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(90, 240)]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _paint_car(img: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """A car seen from the side (wide) or from behind: body, cabin, windows, dark wheels."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    body, glass, tyre = vivid(rng), color(rng, (80, 50, 35), 15), (25, 25, 25)
    if w / h >= 1.6:  # side view
        cv2.rectangle(img, (x1, y1 + int(0.38 * h)), (x2 - 1, y2 - int(0.15 * h)), body, -1)
        cabin = np.array(
            [
                [x1 + 0.22 * w, y1 + 0.4 * h],
                [x1 + 0.3 * w, y1],
                [x2 - 0.25 * w, y1],
                [x2 - 0.12 * w, y1 + 0.4 * h],
            ],
            np.int32,
        )
        cv2.fillConvexPoly(img, cabin, body)
        inset = max(1, h // 10)
        cv2.rectangle(
            img,
            (int(x1 + 0.3 * w) + inset, y1 + inset),
            (int(x2 - 0.25 * w) - inset, y1 + int(0.36 * h)),
            glass,
            -1,
        )
        r = max(2, int(0.2 * h))
        for wx in (x1 + int(0.22 * w), x2 - int(0.22 * w)):
            cv2.circle(img, (wx, y2 - r), r, tyre, -1)
            cv2.circle(img, (wx, y2 - r), max(1, r // 2), (150, 150, 150), -1)
        return
    cv2.rectangle(img, (x1, y1 + int(0.4 * h)), (x2 - 1, y2 - int(0.12 * h)), body, -1)
    cv2.rectangle(img, (x1 + int(0.12 * w), y1), (x2 - int(0.12 * w), y1 + int(0.42 * h)), body, -1)
    cv2.rectangle(
        img,
        (x1 + int(0.2 * w), y1 + max(1, h // 12)),
        (x2 - int(0.2 * w), y1 + int(0.38 * h)),
        glass,
        -1,
    )
    lamp_w = max(1, int(0.16 * w))
    for lx in (x1 + 1, x2 - 1 - lamp_w):
        cv2.rectangle(
            img, (lx, y1 + int(0.5 * h)), (lx + lamp_w, y1 + int(0.62 * h)), (30, 30, 220), -1
        )
    wheel_w = max(2, int(0.18 * w))
    for wx in (x1, x2 - wheel_w):
        cv2.rectangle(img, (wx, y2 - int(0.16 * h) - 1), (wx + wheel_w, y2 - 1), tyre, -1)


def _paint_pedestrian(img: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """A tall thin figure: head, torso, arms and striding legs."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) // 2
    skin, shirt, pants = (
        color(rng, (120, 160, 205), 40),
        vivid(rng),
        color(rng, (70, 60, 55), 30),
    )
    r = max(1, min(int(0.1 * h), w // 2))
    cv2.circle(img, (cx, y1 + r), r, skin, -1)
    hip = y1 + int(0.58 * h)
    cv2.rectangle(
        img, (cx - max(1, int(0.3 * w)), y1 + 2 * r), (cx + max(1, int(0.3 * w)), hip), shirt, -1
    )
    limb = max(1, int(0.18 * w))
    arm_len = int(0.33 * h)
    cv2.line(img, (x1 + limb // 2, y1 + 2 * r), (x1 + limb // 2, y1 + 2 * r + arm_len), shirt, limb)
    cv2.line(
        img,
        (x2 - 1 - limb // 2, y1 + 2 * r),
        (x2 - 1 - limb // 2, y1 + 2 * r + arm_len),
        shirt,
        limb,
    )
    stride = int(uniform(rng, 0.0, 0.35) * w)
    leg = max(1, int(0.25 * w))
    cv2.line(img, (cx - leg // 2, hip), (cx - leg // 2 - stride, y2 - 1), pants, leg)
    cv2.line(img, (cx + leg // 2, hip), (cx + leg // 2 + stride, y2 - 1), pants, leg)


def _paint_cyclist(img: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """A rider on two ring wheels joined by a frame."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    r = max(2, min(int(0.25 * w), int(0.24 * h)))
    rim = max(1, r // 3)
    back, front = (x1 + r, y2 - r), (x2 - 1 - r, y2 - r)
    for c in (back, front):
        cv2.circle(img, c, max(1, r - rim // 2), (25, 25, 25), rim)
    frame, shirt, skin = vivid(rng), vivid(rng), color(rng, (120, 160, 205), 40)
    seat = (x1 + int(0.42 * w), y2 - int(0.55 * h))
    bar = (x2 - int(0.3 * w), y2 - int(0.6 * h))
    thick = max(1, h // 16)
    for a, b in ((back, seat), (seat, front), (front, bar), (back, (x1 + w // 2, y2 - r))):
        cv2.line(img, a, b, frame, thick)
    head_r = max(1, int(0.09 * h))
    shoulder = (x1 + int(0.52 * w), y1 + 2 * head_r + 1)
    cv2.line(img, seat, shoulder, shirt, max(1, int(0.12 * w)))
    cv2.line(img, shoulder, bar, shirt, max(1, thick))
    cv2.line(img, seat, (x1 + w // 2, y2 - r), color(rng, (70, 60, 55), 30), max(1, thick + 1))
    cv2.circle(img, (shoulder[0] + head_r // 2, y1 + head_r), head_r, skin, -1)


def _paint_sign(img: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """A grey pole carrying a round, triangular or square plate."""
    x1, y1, x2, y2 = box
    w = x2 - x1
    cx = (x1 + x2) // 2
    cv2.line(img, (cx, y1 + w // 2), (cx, y2 - 1), color(rng, (150, 150, 150), 20), max(1, w // 7))
    border = max(1, w // 6)
    shape = rng.integers(0, 3)
    if shape == 0:
        cv2.circle(img, (cx, y1 + w // 2), max(1, w // 2), (255, 255, 255), -1)
        cv2.circle(img, (cx, y1 + w // 2), max(1, w // 2 - border // 2), (30, 30, 210), border)
    elif shape == 1:
        tri = np.array([[x1, y1 + w - 1], [x2 - 1, y1 + w - 1], [cx, y1]], np.int32)
        cv2.fillConvexPoly(img, tri, (30, 30, 210))
        inner = np.array(
            [
                [x1 + border, y1 + w - 1 - border // 2],
                [x2 - 1 - border, y1 + w - 1 - border // 2],
                [cx, y1 + 2 * border],
            ],
            np.int32,
        )
        cv2.fillConvexPoly(img, inner, (240, 240, 240))
    else:
        cv2.rectangle(img, (x1, y1), (x2 - 1, y1 + w - 1), (170, 90, 20), -1)
        cv2.rectangle(
            img,
            (x1 + border, y1 + border),
            (x2 - 1 - border, y1 + w - 1 - border),
            (255, 255, 255),
            max(1, border // 2),
        )


PAINTERS: dict[int, Callable[[np.ndarray, Box, np.random.Generator], None]] = {
    0: _paint_car,
    1: _paint_pedestrian,
    2: _paint_cyclist,
    3: _paint_sign,
}

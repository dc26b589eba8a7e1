"""Server-rendered SVG for the device page: a chart of rollup buckets (min-max band, average
line) and a state strip for values that are not numbers. Pure functions: data in, SVG text out.

The SVG has a viewBox and no fixed size, so CSS scales it to the page width (a phone's 360 px or
a desktop's 640): text scales with it, which keeps the labels inside the box at any width.
Every text that came from a record (point names, state labels) goes through html.escape.
"""
import math
import sys
import time
from html import escape

from agent.common import parse_utc

W, H = 360, 132          # viewBox of a chart
LEFT, RIGHT, TOP, BOTTOM = 46, 6, 16, 18   # plot margins: y labels left, time labels below
STRIP_H = 40
# A fixed palette (colour-blind friendly, Okabe-Ito); a state's colour is picked by its label.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#999999")


def fmt_number(v):
    """A tick or value label: at most 6 significant digits, no exponent for everyday sizes."""
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e7:
        text = "%.6g" % v
        return text
    return "%.3g" % v


def _time_label(t, span):
    """A time axis label (UTC): HH:MM within a day's span, else MM-DD HH:MM... shortened."""
    g = time.gmtime(t)
    if span <= 86400 * 1.01:
        return time.strftime("%H:%M", g)
    return time.strftime("%m-%d", g)


def nice_range(lo, hi):
    """(lo, hi) widened to round ticks: -> (lo, hi, step)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0, 0.5
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    # hi/4 - lo/4, not (hi - lo)/4: a float64 point near +-1.8e308 on both sides overflows that
    raw = hi / 4.0 - lo / 4.0
    if not raw >= 1e-300:  # a span too small for a tick (subnormal values): pad it
        lo, hi = lo - 1.0, hi + 1.0
        raw = hi / 4.0 - lo / 4.0
    mag = 10.0 ** math.floor(math.log10(raw))  # a float: an int 10**307 does not mix with floats
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            step = m * mag
            break
    big = sys.float_info.max  # the rounded ends stay floats
    lo2 = max(math.floor(lo / step) * step, -big)
    hi2 = min(math.ceil(hi / step) * step, big)
    return lo2, hi2, step


def _segments(buckets, step):
    """Buckets split where one or more buckets are missing (no band drawn across an outage)."""
    segs, cur, last = [], [], None
    for b in buckets:
        if last is not None and b[0] - last > step * 1.5:
            segs.append(cur)
            cur = []
        cur.append(b)
        last = b[0]
    if cur:
        segs.append(cur)
    return segs


def chart(buckets, since, until, step, label="", unit=None, css_class="chart"):
    """SVG of one point over [since, until) (epoch seconds).

    buckets: [{"t": ts text, "min", "max", "avg", ...}] as series.query_series gives them (bucket
    start times, oldest first); each is drawn from its start to start+step. Non-finite or missing
    numbers are skipped. With no bucket the chart says "no data" (the axes stay)."""
    pts = []
    for b in buckets:
        t = parse_utc(b.get("t")) if isinstance(b.get("t"), str) else b.get("t")
        lo, hi, avg = b.get("min"), b.get("max"), b.get("avg")
        if t is None or not all(type(x) in (int, float) and math.isfinite(x) for x in (lo, hi, avg)):
            continue
        pts.append((float(t), float(lo), float(hi), float(avg)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    span = max(until - since, 1.0)
    out = ['<svg class="%s" viewBox="0 0 %d %d" role="img" aria-label="%s" '
           'xmlns="http://www.w3.org/2000/svg" font-family="system-ui,sans-serif" font-size="10">'
           % (css_class, W, H, escape(label))]
    out.append('<rect class="plot" x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#ccc"/>'
               % (LEFT, TOP, pw, ph))
    out.append('<text class="title" x="%d" y="11" fill="#333">%s</text>' % (LEFT, escape(label)))
    if pts:
        lo, hi, tick = nice_range(min(p[1] for p in pts), max(p[2] for p in pts))
    else:
        lo, hi, tick = 0.0, 1.0, 0.5

    def x(t):
        return LEFT + min(max((t - since) / span, 0.0), 1.0) * pw

    def y(v):  # halves: hi - lo may be beyond the largest float (nice_range)
        return TOP + ph - (v / 2 - lo / 2) / (hi / 2 - lo / 2) * ph

    # y ticks and grid
    n = int(round((hi / 2 - lo / 2) / (tick / 2)))
    for i in range(n + 1):
        v = min(lo + i * tick, hi)
        yy = y(v)
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#e4e4e4"/>' % (LEFT, LEFT + pw, yy, yy))
        out.append('<text class="ytick" x="%d" y="%.1f" text-anchor="end" fill="#555">%s</text>'
                   % (LEFT - 3, yy + 3.5, escape(fmt_number(v))))
    if unit:
        out.append('<text class="unit" x="3" y="11" fill="#555">%s</text>' % escape(unit))
    # x ticks: 4 intervals
    for i in range(5):
        t = since + span * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append('<text class="xtick" x="%.1f" y="%d" text-anchor="%s" fill="#555">%s</text>'
                   % (x(t), H - 5, anchor, _time_label(t, span)))
    if not pts:
        out.append('<text class="nodata" x="%.1f" y="%.1f" text-anchor="middle" fill="#999">no data</text>'
                   % (LEFT + pw / 2, TOP + ph / 2 + 4))
    for seg in _segments(pts, step):
        upper = ["%.1f,%.1f" % (x(t), y(h)) for t, _lo, h, _a in seg] + \
                ["%.1f,%.1f" % (x(t + step), y(h)) for t, _lo, h, _a in seg[-1:]]
        lower = ["%.1f,%.1f" % (x(t + step), y(lo_)) for t, lo_, _h, _a in seg[-1:]] + \
                ["%.1f,%.1f" % (x(t), y(lo_)) for t, lo_, _h, _a in reversed(seg)]
        out.append('<polygon class="band" fill="#9cc6e8" fill-opacity="0.6" stroke="none" points="%s"/>'
                   % " ".join(upper + lower))
        line = ["%.1f,%.1f" % (x(t + step / 2), y(a)) for t, _lo, _h, a in seg]
        if len(line) == 1:  # one bucket: a short tick, so it shows
            t, _lo, _h, a = seg[0]
            line = ["%.1f,%.1f" % (x(t), y(a)), "%.1f,%.1f" % (x(t + step), y(a))]
        out.append('<polyline class="avg" fill="none" stroke="#0b4f8a" stroke-width="1.5" points="%s"/>'
                   % " ".join(line))
    out.append("</svg>")
    return "".join(out)


def color_of(label):
    """A stable palette colour for a state label (same label, same colour, on every page)."""
    h = 0
    for ch in str(label):
        h = (h * 31 + ord(ch)) & 0xFFFFFFFF
    return PALETTE[h % len(PALETTE)]


def state_label(v):
    """A non-numeric value as the strip shows it."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    return str(v)


def state_spans(samples, until, stale=None):
    """[(t, value)] oldest first -> [(t0, t1, label)]: a run of equal values is one span; a span
    ends at the next sample's time (the last one at `until`, or `stale` seconds after its
    sample when the device went quiet: an outage is not painted as the last state)."""
    spans = []
    for i, (t, v) in enumerate(samples):
        label = state_label(v)
        nxt = samples[i + 1][0] if i + 1 < len(samples) else until
        if stale is not None:
            nxt = min(nxt, t + stale)
        if spans and spans[-1][2] == label and spans[-1][1] >= t - 1e-6:
            spans[-1] = (spans[-1][0], nxt, label)
        else:
            spans.append((t, nxt, label))
    return spans


def state_strip(spans, since, until, label=""):
    """SVG strip: one coloured rect per span (tooltip: the state), the labels of the states seen
    as a legend under it."""
    span = max(until - since, 1.0)
    pw = W - LEFT - RIGHT
    out = ['<svg class="strip" viewBox="0 0 %d %d" role="img" aria-label="%s" '
           'xmlns="http://www.w3.org/2000/svg" font-family="system-ui,sans-serif" font-size="10">'
           % (W, STRIP_H, escape(label))]
    out.append('<text class="title" x="%d" y="10" fill="#333">%s</text>' % (LEFT, escape(label)))
    out.append('<rect x="%d" y="13" width="%d" height="12" fill="#f0f0f0" stroke="#ccc"/>' % (LEFT, pw))
    seen = []
    for t0, t1, text in spans:
        a = LEFT + min(max((t0 - since) / span, 0.0), 1.0) * pw
        b = LEFT + min(max((t1 - since) / span, 0.0), 1.0) * pw
        if b <= a:
            continue
        out.append('<rect class="state" x="%.1f" y="13" width="%.1f" height="12" fill="%s">'
                   '<title>%s</title></rect>' % (a, max(b - a, 0.5), color_of(text), escape(text)))
        if text not in seen:
            seen.append(text)
    if not seen:
        out.append('<text class="nodata" x="%.1f" y="23" text-anchor="middle" fill="#999">no data</text>'
                   % (LEFT + pw / 2))
    x = float(LEFT)
    for text in seen[:6]:
        shown = text if len(text) <= 14 else text[:13] + "\u2026"
        out.append('<rect x="%.1f" y="29" width="8" height="8" fill="%s"/>' % (x, color_of(text)))
        out.append('<text class="legend" x="%.1f" y="37" fill="#333">%s</text>' % (x + 10, escape(shown)))
        x += 14 + 6.2 * len(shown)
        if x > W - 40:
            break
    out.append("</svg>")
    return "".join(out)

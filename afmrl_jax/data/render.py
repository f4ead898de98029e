"""PIL rendering of synthetic product listings.

Two steps, so that the listings of one product share the costly part:
- `render_product(category, attrs, size, detail_scale)`: the product itself on a transparent canvas
  (RGBA uint8 [n, n, 4], n = `canvas_size(size)`), a pure function of the attributes (duplicates relisted
  by other sellers look exactly like the original item). Small images are drawn at twice the output size
  and downsampled, so that small details (logo, neckline, laces) survive at 64x64 as a few distinct pixels.
- `render_listing(product_rgba, view, size)`: one photo of it (uint8 [size, size, 3]): background, scale,
  translation (crop), rotation, lighting, sensor noise and a real JPEG round trip.
`sample_view(rng, strength)` draws the view parameters; strength 0 gives a centred, clean photo.
"""
from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image, ImageDraw

from afmrl_jax.data import schema


@dataclasses.dataclass(frozen=True)
class View:
  """Photo parameters of one listing. Scale is the product's size relative to the frame."""
  background: tuple[int, int, int]
  background2: tuple[int, int, int]  # gradient end colour (equal to `background` for a flat one)
  scale: float
  dx: float  # translation, fraction of the frame
  dy: float
  angle: float  # degrees
  brightness: float
  cast: tuple[float, float, float]  # per-channel gain (colour cast of the lighting)
  noise: float  # Gaussian sensor noise std, in 0..255 units
  jpeg_quality: int


def sample_view(rng: np.random.Generator, strength: float = 1.0) -> View:
  """Random view; `strength` in [0, 2] scales every augmentation range (0 = clean, centred)."""
  s = float(strength)
  light = rng.uniform(200, 255, size=3)
  tint = light - rng.uniform(0, 60 * min(s, 1.0), size=3)
  bg = tuple(int(v) for v in np.clip(tint, 0, 255))
  bg2 = bg if rng.random() < 0.5 else tuple(int(v) for v in np.clip(tint - rng.uniform(0, 50 * s, size=3), 0, 255))
  return View(
      background=bg,
      background2=bg2,
      scale=float(np.clip(1.0 - rng.uniform(0, 0.3 * s), 0.5, 1.2)),
      dx=float(rng.uniform(-0.08, 0.08) * s),
      dy=float(rng.uniform(-0.08, 0.08) * s),
      angle=float(rng.uniform(-12, 12) * s),
      brightness=float(np.clip(1.0 + rng.uniform(-0.2, 0.15) * s, 0.5, 1.5)),
      cast=tuple(float(v) for v in 1.0 + rng.uniform(-0.06, 0.06, size=3) * s),
      noise=float(rng.uniform(0, 5) * s),
      jpeg_quality=int(np.clip(95 - rng.uniform(0, 50) * s, 20, 95)),
  )


# ----------------------------------------------------------------------------- fills (pattern x material)

def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
  """A pattern / trim colour that stands out against `rgb`."""
  lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return (35, 35, 40) if lum > 150 else (245, 245, 240)


@functools.lru_cache(maxsize=64)
def _pattern_mask(pattern: str, n: int) -> np.ndarray:
  """float32 [n, n] in {0, 1}: where the pattern's second colour goes."""
  y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
  if pattern == "solid":
    m = np.zeros((n, n), np.float32)
  elif pattern == "stripes":
    m = ((y * 9) % 1.0 < 0.4).astype(np.float32)
  elif pattern == "dots":
    p = 1 / 8
    m = (((x % p - p / 2) ** 2 + (y % p - p / 2) ** 2) < (p * 0.28) ** 2).astype(np.float32)
  elif pattern == "checks":
    m = (((x * 6).astype(int) + (y * 6).astype(int)) % 2).astype(np.float32) * 0.75
  elif pattern == "floral":
    p = 1 / 6
    u, v = x % p - p / 2, y % p - p / 2
    r = np.sqrt(u * u + v * v) / p
    theta = np.arctan2(v, u)
    petals = r < 0.22 + 0.16 * np.cos(4 * theta)  # four-petal rose curve
    m = (petals & (r > 0.06)).astype(np.float32)
  else:
    raise ValueError(f"render: unknown pattern {pattern!r}")
  return m


@functools.lru_cache(maxsize=64)
def _material_gain(material: str, n: int) -> np.ndarray:
  """float32 [n, n] brightness multiplier giving each material a visible texture."""
  y, x = np.mgrid[0:n, 0:n].astype(np.float32)
  px = max(n // 64, 1)  # texture period in canvas pixels, ~1 output pixel
  if material == "cotton":
    g = np.ones((n, n), np.float32)
  elif material == "denim":  # diagonal twill
    g = 1.0 - 0.22 * ((((x + y) // (2 * px)) % 2) == 0)
  elif material == "knit":  # vertical ribs
    g = 1.0 - 0.2 * (((x // (2 * px)) % 2) == 0)
  elif material == "leather":  # soft vertical sheen
    g = 0.85 + 0.3 * np.exp(-((x / n - 0.35) ** 2) / 0.01)
  elif material == "silk":  # strong diagonal highlight
    g = 0.9 + 0.45 * np.exp(-(((x + y) / n - 0.8) ** 2) / 0.02)
  else:
    raise ValueError(f"render: unknown material {material!r}")
  return g.astype(np.float32)


def _fill(n: int, colour: str, pattern: str, material: str) -> np.ndarray:
  """uint8 [n, n, 3]: the fabric of the product (cached for small canvases: few fabrics, many products)."""
  if n <= 256:
    return _fill_cached(n, colour, pattern, material)
  return _fill_uncached(n, colour, pattern, material)


@functools.lru_cache(maxsize=512)  # <= 512 x 196 KB
def _fill_cached(n, colour, pattern, material):
  return _fill_uncached(n, colour, pattern, material)


def _fill_uncached(n: int, colour: str, pattern: str, material: str) -> np.ndarray:
  base = np.array(schema.rgb(colour), np.float32)
  second = np.array(_contrast(schema.rgb(colour)), np.float32)
  m = _pattern_mask(pattern, n)[..., None]
  rgb = base * (1 - m) + second * m
  rgb = rgb * _material_gain(material, n)[..., None]
  return np.clip(rgb, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- per-category drawing

def _shade(rgb, f):
  return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


class _Canvas:
  """Silhouette mask + detail overlay in unit coordinates ([0, 1]^2 -> pixels)."""

  def __init__(self, n: int, detail: float):
    self.n = n
    self.detail = detail
    self.mask = Image.new("L", (n, n), 0)
    self.over = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    self.dm = ImageDraw.Draw(self.mask)
    self.do = ImageDraw.Draw(self.over)

  def p(self, pts):
    return [(x * self.n, y * self.n) for x, y in pts]

  def box(self, x0, y0, x1, y1):
    return [x0 * self.n, y0 * self.n, x1 * self.n, y1 * self.n]

  def w(self, v):  # line width in pixels
    return max(int(round(v * self.n)), 1)


def _mirror(pts):
  return [(1 - x, y) for x, y in pts]


_SLEEVE = {  # left sleeve polygons hanging from the shoulder at x0 (relative to shoulder)
    "short": [(0, 0), (-0.13, 0.16), (-0.06, 0.22), (0.0, 0.14)],
    "three-quarter": [(0, 0), (-0.17, 0.34), (-0.1, 0.37), (0.0, 0.14)],
    "long": [(0, 0), (-0.2, 0.52), (-0.13, 0.55), (0.0, 0.14)],
}


def _sleeves(c: _Canvas, sleeve: str, x0: float, y0: float):
  if sleeve == "sleeveless":
    return
  pts = [(x0 + dx, y0 + dy) for dx, dy in _SLEEVE[sleeve]]
  c.dm.polygon(c.p(pts), fill=255)
  c.dm.polygon(c.p(_mirror(pts)), fill=255)


def _neckline(c: _Canvas, neckline: str, y0: float, trim):
  d = 0.075 * c.detail + 0.02
  if neckline == "round":
    c.dm.ellipse(c.box(0.5 - d, y0 - d * 0.8, 0.5 + d, y0 + d * 0.8), fill=0)
  elif neckline == "v-neck":
    c.dm.polygon(c.p([(0.5 - d, y0), (0.5 + d, y0), (0.5, y0 + 1.7 * d)]), fill=0)
  elif neckline == "square":
    c.dm.rectangle(c.box(0.5 - d, y0, 0.5 + d, y0 + 1.1 * d), fill=0)
  elif neckline == "collar":
    c.dm.ellipse(c.box(0.5 - d * 0.7, y0 - d * 0.5, 0.5 + d * 0.7, y0 + d * 0.5), fill=0)
    flap = [(0.5 - d * 1.3, y0), (0.5, y0 + d * 0.6), (0.5 - d * 0.9, y0 + d * 1.4)]
    c.do.polygon(c.p(flap), fill=trim + (255,))
    c.do.polygon(c.p(_mirror(flap)), fill=trim + (255,))
  else:
    raise ValueError(f"render: unknown neckline {neckline!r}")


def _draw_top(c: _Canvas, a: dict):
  c.dm.rectangle(c.box(0.3, 0.22, 0.7, 0.86), fill=255)
  _sleeves(c, a["sleeve"], 0.3, 0.22)
  _neckline(c, a["neckline"], 0.22, _contrast(schema.rgb(a["colour"])))
  s = 0.05 + 0.05 * c.detail
  x = {"left chest": 0.38, "centre": 0.5, "right chest": 0.62}[a["logo position"]]
  y = 0.45 if a["logo position"] == "centre" else 0.4
  c.do.rectangle(c.box(x - s / 2, y - s / 2, x + s / 2, y + s / 2), fill=schema.rgb(a["logo colour"]) + (255,))


_HEM = {"mini": 0.62, "knee": 0.74, "midi": 0.85, "maxi": 0.96}


def _draw_dress(c: _Canvas, a: dict):
  hem = _HEM[a["length"]]
  flare = 0.1 + 0.12 * (hem - 0.6)
  c.dm.rectangle(c.box(0.37, 0.16, 0.63, 0.46), fill=255)
  c.dm.polygon(c.p([(0.37, 0.45), (0.63, 0.45), (0.63 + flare, hem), (0.37 - flare, hem)]), fill=255)
  _sleeves(c, a["sleeve"], 0.37, 0.16)
  trim = _contrast(schema.rgb(a["colour"]))
  _neckline(c, a["neckline"], 0.16, trim)
  if a["belt"] != "none":
    h = (0.025 if a["belt"] == "thin" else 0.06) * (0.5 + 0.5 * c.detail)
    c.do.rectangle(c.box(0.37, 0.45 - h / 2, 0.63, 0.45 + h / 2), fill=trim + (255,))


_LEG_HEM = {"shorts": 0.42, "cropped": 0.72, "full": 0.93}
_LEG_W = {"skinny": 0.1, "straight": 0.15, "wide": 0.22}


def _draw_trousers(c: _Canvas, a: dict):
  hem, w = _LEG_HEM[a["length"]], _LEG_W[a["fit"]]
  if a["length"] == "shorts":
    w *= 1.3
  c.dm.rectangle(c.box(0.3, 0.1, 0.7, 0.18), fill=255)
  left = [(0.3, 0.17), (0.5, 0.17), (0.5, 0.3), (0.47, hem), (0.47 - w, hem), (0.3 - (w - 0.15) * 0.5, 0.3)]
  c.dm.polygon(c.p(left), fill=255)
  c.dm.polygon(c.p(_mirror(left)), fill=255)
  dark = _shade(schema.rgb(a["colour"]), 0.55) + (255,)
  trim = _contrast(schema.rgb(a["colour"])) + (255,)
  c.do.line(c.p([(0.3, 0.18), (0.7, 0.18)]), fill=dark, width=c.w(0.012))
  if a["pockets"] == "side":
    for pts in ([(0.33, 0.19), (0.39, 0.29)], [(0.67, 0.19), (0.61, 0.29)]):
      c.do.line(c.p(pts), fill=trim, width=c.w(0.015 * (0.5 + c.detail)))
  elif a["pockets"] == "patch":
    s = 0.045 + 0.03 * c.detail
    for x in (0.38, 0.62):
      c.do.rectangle(c.box(x - s, 0.22, x + s, 0.22 + 1.4 * s), outline=trim, width=c.w(0.012))
  if a["waistband"] == "drawstring":
    for x in (0.47, 0.53):
      c.do.line(c.p([(x, 0.14), (x + (x - 0.5) * 0.8, 0.27)]), fill=trim, width=c.w(0.012 * (0.5 + c.detail)))
  elif a["waistband"] == "belt loops":
    for x in (0.34, 0.43, 0.57, 0.66):
      c.do.rectangle(c.box(x - 0.012, 0.09, x + 0.012, 0.19), fill=trim)


def _draw_bag(c: _Canvas, a: dict):
  shape = a["shape"]
  top = {"tote": 0.36, "satchel": 0.42, "clutch": 0.5, "bucket": 0.36}[shape]
  bottom = {"tote": 0.86, "satchel": 0.84, "clutch": 0.74, "bucket": 0.88}[shape]
  if shape == "tote":
    c.dm.polygon(c.p([(0.2, top), (0.8, top), (0.72, bottom), (0.28, bottom)]), fill=255)
  elif shape == "satchel":
    c.dm.rounded_rectangle(c.box(0.22, top, 0.78, bottom), radius=0.08 * c.n, fill=255)
  elif shape == "clutch":
    c.dm.rectangle(c.box(0.16, top, 0.84, bottom), fill=255)
  elif shape == "bucket":
    c.dm.polygon(c.p([(0.32, top), (0.68, top), (0.78, bottom - 0.05), (0.22, bottom - 0.05)]), fill=255)
    c.dm.ellipse(c.box(0.22, bottom - 0.1, 0.78, bottom), fill=255)
  metal = schema.rgb(a["hardware"]) + (255,)
  body = schema.rgb(a["colour"])
  dark = _shade(body, 0.6) + (255,)
  hw = 0.025 + 0.015 * c.detail
  xl, xr = (0.33, 0.67) if shape != "clutch" else (0.28, 0.72)
  handle = a["handle"]
  if handle != "none":
    h = {"short": 0.14, "long strap": 0.3, "chain": 0.3}[handle]
    xa, xb = (xl, xr) if handle == "short" else (xl - 0.08, xr + 0.08)
    box = c.box(xa, top - h, xb, top + h)
    if handle == "chain":
      for t in np.linspace(185, 355, 12):
        px = (xa + xb) / 2 + (xb - xa) / 2 * np.cos(np.radians(t))
        py = top + h * np.sin(np.radians(t))
        c.do.ellipse(c.box(px - 0.015, py - 0.015, px + 0.015, py + 0.015), fill=metal)
    else:
      c.do.arc(box, 180, 360, fill=dark, width=c.w(0.025))
  for x in (xl, xr):  # rings where a handle attaches: hardware is always visible
    c.do.ellipse(c.box(x - hw, top - hw, x + hw, top + hw), fill=metal)
  closure = a["closure"]
  if closure == "zip":
    c.do.line(c.p([(0.3, top + 0.03), (0.7, top + 0.03)]), fill=metal, width=c.w(0.018))
  elif closure == "flap":
    c.do.polygon(c.p([(0.24, top), (0.76, top), (0.7, top + 0.2), (0.5, top + 0.25), (0.3, top + 0.2)]),
                 fill=_shade(body, 0.8) + (255,), outline=dark)
  elif closure == "buckle":
    b = 0.04 + 0.03 * c.detail
    c.do.rectangle(c.box(0.5 - b, top + 0.08, 0.5 + b, top + 0.08 + 1.2 * b), outline=metal, width=c.w(0.02))
  elif closure == "open":
    c.do.ellipse(c.box(0.3, top - 0.03, 0.7, top + 0.04), fill=(20, 20, 20, 255))
  s = 0.03 + 0.035 * c.detail
  c.do.rectangle(c.box(0.5 - s, bottom - 0.12, 0.5 + s, bottom - 0.12 + s), fill=schema.rgb(a["logo colour"]) + (255,))


def _draw_shoe(c: _Canvas, a: dict):
  style, toe = a["style"], a["toe"]
  sole_y = 0.74
  heel_lift = 0.16 if style == "heel" else 0.0
  collar = {"sneaker": 0.5, "boot": 0.18, "heel": 0.52, "loafer": 0.56}[style]
  upper = [(0.14, sole_y - heel_lift), (0.14, collar), (0.38, collar + 0.02), (0.62, 0.56), (0.84, 0.64),
           (0.86, sole_y)]
  if style == "boot":
    upper = [(0.14, sole_y), (0.14, collar), (0.4, collar), (0.42, 0.52), (0.7, 0.58), (0.84, 0.64), (0.86, sole_y)]
  c.dm.polygon(c.p(upper), fill=255)
  if toe == "round":
    c.dm.ellipse(c.box(0.74, 0.6, 0.92, sole_y + 0.02), fill=255)
  elif toe == "pointed":
    c.dm.polygon(c.p([(0.8, 0.62), (0.97, sole_y), (0.8, sole_y)]), fill=255)
  elif toe == "square":
    c.dm.rectangle(c.box(0.78, 0.61, 0.91, sole_y), fill=255)
  sole = schema.rgb(a["sole"]) + (255,)
  c.do.polygon(c.p([(0.13, sole_y - heel_lift), (0.5, sole_y - 0.02), (0.93, sole_y), (0.93, sole_y + 0.06),
                    (0.5, sole_y + 0.05 - 0.02), (0.13, sole_y - heel_lift + 0.05)]), fill=sole)
  if style == "heel":
    c.do.polygon(c.p([(0.14, sole_y - heel_lift), (0.2, sole_y - heel_lift), (0.19, sole_y + 0.06),
                      (0.16, sole_y + 0.06)]), fill=sole)
  if a["laces"] != "none":
    lace = schema.rgb(a["laces"]) + (255,)
    # a mid-grey tongue under the laces: white and black laces both show on it, whatever the upper's colour
    c.do.polygon(c.p([(0.38, 0.5), (0.66, 0.55), (0.64, 0.64), (0.38, 0.6)]), fill=(128, 128, 128, 255))
    for i in range(3):
      x = 0.44 + 0.07 * i
      y = 0.55 + 0.025 * i
      c.do.line(c.p([(x - 0.03, y - 0.02), (x + 0.03, y + 0.03)]), fill=lace, width=c.w(0.016 * (0.6 + c.detail)))
      c.do.line(c.p([(x - 0.03, y + 0.03), (x + 0.03, y - 0.02)]), fill=lace, width=c.w(0.016 * (0.6 + c.detail)))
  s = 0.025 + 0.025 * c.detail
  logo = schema.rgb(a["logo colour"]) + (255,)
  c.do.polygon(c.p([(0.3, 0.66), (0.52, 0.62 - s), (0.55, 0.62), (0.33, 0.66 + s)]), fill=logo)


_DRAW = {"tops": _draw_top, "dresses": _draw_dress, "trousers": _draw_trousers, "bags": _draw_bag,
         "shoes": _draw_shoe}


def canvas_size(size: int) -> int:
  """Drawing resolution: 2x supersampling up to 128 px output (cheap, and where it matters), 1x above."""
  return 2 * int(size) if size <= 128 else int(size)


def render_product(category: str, attrs: dict[str, str], size: int, detail_scale: float = 1.0) -> np.ndarray:
  """The product on a transparent canvas: uint8 [n, n, 4] (RGBA, n = `canvas_size(size)`), a pure function
  of its inputs.

  `detail_scale` (0.5 = hard .. 2 = easy) scales the small distinguishing details (logo, belt, laces, ...).
  """
  if category not in _DRAW:
    raise ValueError(f"render: unknown category {category!r}; known: {', '.join(_DRAW)}")
  missing = [k for k in schema.SCHEMA[category] if k not in attrs]
  if missing:
    raise ValueError(f"render: {category} attributes lack {missing}")
  n = canvas_size(size)
  c = _Canvas(n, float(detail_scale))
  _DRAW[category](c, attrs)
  fabric = _fill(n, attrs["colour"], attrs.get("pattern", "solid"), attrs["material"])
  rgba = np.concatenate([fabric, np.asarray(c.mask)[..., None]], axis=-1)
  out = Image.fromarray(rgba, "RGBA")
  out.alpha_composite(c.over)
  return np.asarray(out)


def _background(size: int, view: View) -> np.ndarray:
  """uint8 [size, size, 4]: opaque vertical gradient."""
  a = np.array(view.background + (255,), np.float32)
  b = np.array(view.background2 + (255,), np.float32)
  t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
  return np.ascontiguousarray(np.broadcast_to(a * (1 - t) + b * t, (size, size, 4)).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
  """float32 [2*size, 2*size, 3] unit Gaussian noise; views crop it at random offsets (cheaper than drawing
  fresh noise per pixel, and still a function of the view's rng)."""
  return np.random.default_rng(12345).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def downsample_product(product_rgba: np.ndarray, size: int) -> Image.Image:
  """The 2x canvas box-filtered to the output size (done once per product, then reused by its views)."""
  return Image.fromarray(product_rgba, "RGBA").resize((size, size), Image.BOX)


def render_listing(product: np.ndarray | Image.Image, view: View, size: int,
                   noise_rng: np.random.Generator) -> np.ndarray:
  """One photo of a product: uint8 [size, size, 3]. `noise_rng` draws the sensor noise.

  `product` is `render_product`'s RGBA canvas or its `downsample_product` (faster for many views).
  """
  if not isinstance(product, Image.Image):
    product = downsample_product(product, size)
  n = product.size[0]
  # One affine warp (output pixel -> product pixel) does scale, rotation and translation (the crop).
  theta = np.radians(view.angle)
  k = n / (size * view.scale)
  cos, sin = np.cos(theta) * k, np.sin(theta) * k
  cx = cy = size / 2
  ox, oy = cx + view.dx * size, cy + view.dy * size
  c0 = n / 2 - cos * ox - sin * oy
  c1 = n / 2 + sin * ox - cos * oy
  warped = product.transform((size, size), Image.AFFINE, (cos, sin, c0, -sin, cos, c1), Image.BILINEAR)
  bg = Image.fromarray(_background(size, view), "RGBA")
  bg.alpha_composite(warped)
  # Lighting as a per-channel lookup table (one C pass instead of float maths over the image).
  gains = view.brightness * np.asarray(view.cast, np.float64)
  lut = np.clip(np.arange(256)[None, :] * gains[:, None], 0, 255).astype(np.uint8).reshape(-1).tolist()
  photo = bg.convert("RGB").point(lut)
  if view.noise > 0:
    bank = _noise_bank(size)
    oy, ox = noise_rng.integers(0, size, size=2)
    noise = bank[oy:oy + size, ox:ox + size] * np.float32(view.noise)
    photo = Image.fromarray(np.clip(np.asarray(photo, np.float32) + noise, 0, 255).astype(np.uint8))
  buf = io.BytesIO()
  photo.save(buf, format="JPEG", quality=view.jpeg_quality)
  buf.seek(0)
  with Image.open(buf) as jpg:
    return np.asarray(jpg.convert("RGB"))

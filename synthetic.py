"""Synthetic street scenes written in the exact Cityscapes layout and label encoding.

The real dataset needs a login to download; this data set lets the whole pipeline (loader, training, evaluation,
label-id export) run end to end anywhere, and gives a model something real to learn in minutes.

Each image is drawn with a pinhole camera looking down a street: sky, facades with windows, a road with markings,
sidewalks, grass, trees, poles with signs and lights, walls, fences, cars, trucks, buses, trams, people, riders,
bicycles and motorcycles, plus the ids Cityscapes ignores (ego vehicle, rectification border, out of roi, static,
dynamic, parking, unlabeled).
Class colors overlap on purpose (gray road, gray facades, gray cars and poles, white sky, paint and vans; green
trees and grass), and lighting, shadows and noise vary per image, so color alone cannot label a pixel: shape,
position and context must. Every image depends only on (seed, split, index): same seed, byte-identical files.

    python synthetic.py --root data/synthetic --train 48 --val 16 --size 256 512 --seed 0
"""

import argparse
import os
import time
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

# Cityscapes label ids (cityscapesscripts labels.py) of everything drawn here. The data loader maps them to
# train ids; ids without a train id are ignored in training and evaluation, as in the real data.
UNLABELED = 0
EGO_VEHICLE = 1
RECTIFICATION_BORDER = 2
OUT_OF_ROI = 3
STATIC = 4
DYNAMIC = 5
ROAD = 7
SIDEWALK = 8
PARKING = 9
BUILDING = 11
WALL = 12
FENCE = 13
POLE = 17
TRAFFIC_LIGHT = 19
TRAFFIC_SIGN = 20
VEGETATION = 21
TERRAIN = 22
SKY = 23
PERSON = 24
RIDER = 25
CAR = 26
TRUCK = 27
BUS = 28
TRAM = 31  # Cityscapes' "train" class: trains and trams
MOTORCYCLE = 32
BICYCLE = 33

GENERATOR_VERSION = 1  # part of the marker: bump it when the drawing changes, so old data sets get regenerated
SPLIT_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}
FRAME = 19  # every gtFine image in Cityscapes is frame 000019 of its snippet
MARKER = "SYNTHETIC"
PARTIAL_MARKER = "SYNTHETIC.partial"  # written first, so a folder left by an interrupted run is known to be ours

NEAR = 0.5  # metres: points closer than this are projected as if here, so polygons under the camera stay finite
SHIFT = 3  # fractional bits of the coordinates given to cv2: small, far objects keep their shape
FAR_OBJECTS = 90.0  # metres: objects further away would be a few pixels at most

# Per-class texture: how strongly fine grain, medium blotches and coarse stains modulate the brightness.
TEXTURE = {
    ROAD: (0.05, 0.04, 0.05),
    PARKING: (0.06, 0.05, 0.05),
    SIDEWALK: (0.05, 0.06, 0.06),
    BUILDING: (0.03, 0.05, 0.05),
    WALL: (0.05, 0.08, 0.06),
    VEGETATION: (0.35, 0.2, 0.1),
    TERRAIN: (0.22, 0.12, 0.12),
    CAR: (0.02, 0.03, 0.0),
    EGO_VEHICLE: (0.02, 0.04, 0.0),
}

# Base colors (RGB). Every object jitters them, and the palettes of different classes overlap.
BUILDING_COLORS = [(125, 125, 125), (170, 168, 164), (195, 180, 155), (215, 205, 182), (150, 85, 65), (85, 85, 90),
                   (225, 225, 220), (220, 200, 145), (200, 160, 150), (140, 150, 160)]
ROAD_COLORS = [(75, 75, 80), (100, 100, 104), (125, 123, 125), (90, 85, 85)]
SIDEWALK_COLORS = [(140, 138, 135), (170, 160, 145), (150, 105, 95), (115, 115, 118)]
TERRAIN_COLORS = [(110, 130, 70), (135, 125, 90), (95, 115, 60), (150, 140, 110)]
VEGETATION_COLORS = [(60, 95, 40), (85, 115, 50), (45, 70, 35), (110, 135, 70)]
CAR_COLORS = [(195, 195, 200), (150, 150, 155), (100, 100, 105), (40, 40, 45), (230, 230, 230), (35, 50, 95),
              (145, 30, 30), (65, 85, 125), (95, 70, 50), (180, 172, 150)]
BUS_COLORS = [(230, 230, 225), (215, 190, 60), (180, 40, 40), (50, 90, 160), (120, 150, 110)]
TRAM_COLORS = [(200, 40, 40), (230, 230, 225), (240, 200, 60), (60, 110, 170)]
CLOTHES_COLORS = [(30, 30, 35), (60, 60, 70), (120, 120, 125), (40, 50, 90), (150, 40, 40), (200, 200, 195),
                  (110, 90, 60), (70, 100, 70), (190, 150, 60)]
SKIN_COLORS = [(230, 190, 160), (200, 150, 115), (150, 100, 70), (95, 65, 45)]
POLE_COLORS = [(120, 120, 120), (160, 160, 158), (70, 80, 72), (90, 90, 95)]

# Vehicle silhouettes: x across the width in [-0.5, 0.5] or along the length in [0, 1], y up as a fraction of the
# height. "back" is the face towards the camera, "side" the long face towards the middle of the street.
CAR_BACK = np.array([(-0.5, 0.2), (0.5, 0.2), (0.5, 0.58), (0.46, 0.65), (0.37, 0.97), (0.3, 1.0), (-0.3, 1.0),
                     (-0.37, 0.97), (-0.46, 0.65), (-0.5, 0.58)])
CAR_BACK_WINDOW = np.array([(-0.38, 0.69), (0.38, 0.69), (0.32, 0.93), (-0.32, 0.93)])
CAR_SIDE = np.array([(0.0, 0.2), (1.0, 0.2), (1.0, 0.52), (0.97, 0.6), (0.78, 0.66), (0.64, 0.99), (0.6, 1.0),
                     (0.3, 1.0), (0.25, 0.97), (0.13, 0.66), (0.02, 0.6), (0.0, 0.5)])
CAR_SIDE_WINDOW = np.array([(0.17, 0.68), (0.28, 0.95), (0.61, 0.95), (0.73, 0.68)])


def rect(x0, y0, x1, y1):
    """Corners of axis-aligned rectangles: (4, 2) for numbers, (..., 4, 2) for arrays of bounds."""
    if all(np.ndim(v) == 0 for v in (x0, y0, x1, y1)):
        return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)
    x0, y0, x1, y1 = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x0, y0, x1, y1)))
    return np.stack([np.stack(corner, -1) for corner in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], -2)


def grid(a, b):
    """All pairs of two 1-D arrays, as two flat arrays."""
    aa, bb = np.meshgrid(a, b, indexing="ij")
    return aa.ravel(), bb.ravel()


def regular_polygon(n, radius, phase=0.0):
    return unit_polygon(n, phase) * radius


@cache
def unit_polygon(n, phase):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def jitter(rng, color, amount=12.0, brightness=0.15):
    """A color near `color`: a random brightness change plus a small random shift per channel."""
    gain = 1.0 + rng.uniform(-brightness, brightness)
    return np.asarray(color, np.float64) * gain + rng.normal(0.0, amount, 3)  # drawing clips to 0..255


def pick(rng, palette, amount=12.0, brightness=0.15):
    return jitter(rng, palette[rng.integers(len(palette))], amount, brightness)


def smooth_noise(rng, shape, cell):
    """Zero-mean, unit-variance noise that varies smoothly over about `cell` pixels."""
    h, w = shape
    if cell <= 1.0:
        return rng.standard_normal(shape, dtype=np.float32)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return (field - field.mean()) / (field.std() + 1e-6)


def _fixed(points):
    return np.round(np.asarray(points, np.float64) * (1 << SHIFT)).astype(np.int32)


def _color(color):
    return tuple(min(max(float(c), 0.0), 255.0) for c in color)


class Scene:
    """One image being drawn: an RGB float image, its label map, and the camera that places world points.

    World coordinates are metres: x to the right, y up from the road, z ahead of the camera. Every shape is drawn
    into the image and, given a label id, with the same geometry into the label map.
    """

    def __init__(self, rng, size):
        self.rng = rng
        self.height, self.width = size
        self.image = np.zeros((self.height, self.width, 3), np.float32)
        self.label = np.zeros((self.height, self.width), np.uint8)
        self.focal = self.width * rng.uniform(0.9, 1.2)
        self.cx = self.width * rng.uniform(0.42, 0.58)
        self.horizon = self.height * rng.uniform(0.36, 0.5)
        self.camera_height = rng.uniform(1.15, 1.5)
        self.sunny = rng.random() < 0.5
        self.sun_side = rng.choice([-1, 1])  # facades on this side cast shadows onto the street

    def project(self, x, y, z):
        """World coordinates (arrays of one shape) -> pixel coordinates, the shape with a last axis (u, v)."""
        z = np.maximum(z, NEAR)
        return np.stack([self.cx + self.focal * x / z, self.horizon + self.focal * (self.camera_height - y) / z], -1)

    def front(self, x, z, xy):
        """Pixels of points `xy` (..., 2: across, up) on the upright plane facing the camera at depth z, around x."""
        xy = np.asarray(xy, np.float64)
        return self.project(x + xy[..., 0], xy[..., 1], z)

    def side(self, x, z, zy):
        """Pixels of points `zy` (..., 2: along the street, up) on the upright plane at x, from depth z on."""
        zy = np.asarray(zy, np.float64)
        return self.project(x, zy[..., 1], z + zy[..., 0])

    def ground(self, x0, x1, z0, z1):
        """Pixel corners of road-level rectangles x0..x1, z0..z1: (4, 2), or (..., 4, 2) for arrays of bounds."""
        corners = rect(x0, z0, x1, z1)
        return self.project(corners[..., 0], 0.0, corners[..., 1])

    def pixels_per_metre(self, z):
        return self.focal / max(z, NEAR)

    def fill(self, polygons, color, label_id=None):
        """Fill pixel polygons (a list of (K, 2), or (N, K, 2)) with `color` and, given `label_id`, the same pixels
        of the label map."""
        if len(polygons) == 0:
            return
        points = list(_fixed(polygons)) if isinstance(polygons, np.ndarray) else [_fixed(p) for p in polygons]
        cv2.fillPoly(self.image, points, _color(color), cv2.LINE_8, SHIFT)
        if label_id is not None:
            cv2.fillPoly(self.label, points, int(label_id), cv2.LINE_8, SHIFT)

    def line(self, p0, p1, width, color, label_id=None):
        """A line `width` pixels wide (at least 1) between pixel points p0 and p1."""
        a, b = (tuple(int(v) for v in _fixed(p)) for p in (p0, p1))
        width = max(1, int(round(width)))
        cv2.line(self.image, a, b, _color(color), width, cv2.LINE_8, SHIFT)
        if label_id is not None:
            cv2.line(self.label, a, b, int(label_id), width, cv2.LINE_8, SHIFT)

    def ring(self, center, radius, width, color, label_id=None):
        """A circle outline of `width` pixels (at least 1) around a pixel center."""
        c = tuple(int(v) for v in _fixed(center))
        r = int(round(radius * (1 << SHIFT)))
        width = max(1, int(round(width)))
        cv2.circle(self.image, c, r, _color(color), width, cv2.LINE_8, SHIFT)
        if label_id is not None:
            cv2.circle(self.label, c, r, int(label_id), width, cv2.LINE_8, SHIFT)

    def darken(self, polygon, factor):
        """Multiply the image inside a pixel polygon by `factor` (a shadow); the labels do not change."""
        x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
        x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        if x0 >= x1 or y0 >= y1:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [_fixed(polygon - (x0, y0))], 1, cv2.LINE_8, SHIFT)
        self.image[y0:y1, x0:x1][mask.astype(bool)] *= factor


@dataclass
class Street:
    """Where things are, across the street (x, metres) and along it (z)."""

    lane: float  # lane width
    lanes: list  # x of the lane centres that traffic drives in
    road_left: float  # x of the left curb
    road_right: float
    parking_left: float  # width of a parking strip along the curb (0: none)
    parking_right: float
    walk_left: float  # x of the outer edge of the sidewalk
    walk_right: float
    facade_left: float  # x of the facade plane
    facade_right: float
    z_end: float  # the street ends at a row of buildings, or fades into the horizon
    closed: bool
    crossing: float  # z of a zebra crossing, or 0 for none
    tram_lane: float | None  # x of a lane with tram rails in it
    park_left: bool  # a park instead of a row of buildings
    park_right: bool

    def curb(self, side):
        return self.road_left if side < 0 else self.road_right

    def walk(self, side):
        return self.walk_left if side < 0 else self.walk_right

    def facade(self, side):
        return self.facade_left if side < 0 else self.facade_right

    def parking(self, side):
        return self.parking_left if side < 0 else self.parking_right

    def park(self, side):
        return self.park_left if side < 0 else self.park_right


def plan_street(rng):
    lane = rng.uniform(2.8, 3.6)
    lanes_left = int(rng.choice([0, 1, 1, 1, 2]))
    lanes_right = int(rng.choice([1, 1, 1, 2]))
    parking_left = rng.uniform(2.0, 2.5) if rng.random() < 0.25 else 0.0
    parking_right = rng.uniform(2.0, 2.5) if rng.random() < 0.3 else 0.0
    road_left = -(lane / 2 + lanes_left * lane + parking_left)
    road_right = lane / 2 + (lanes_right - 1) * lane + parking_right
    walk_left = road_left - rng.uniform(1.8, 5.0)
    walk_right = road_right + rng.uniform(1.8, 5.0)
    closed = rng.random() < 0.5
    lanes = [(i + 0.5) * lane - lane / 2 for i in range(-lanes_left, lanes_right)]
    return Street(
        lane=lane,
        lanes=lanes,
        road_left=road_left,
        road_right=road_right,
        parking_left=parking_left,
        parking_right=parking_right,
        walk_left=walk_left,
        walk_right=walk_right,
        facade_left=walk_left - (rng.uniform(1.0, 5.0) if rng.random() < 0.45 else 0.0),  # front gardens
        facade_right=walk_right + (rng.uniform(1.0, 5.0) if rng.random() < 0.45 else 0.0),
        z_end=rng.uniform(50.0, 150.0) if closed else 400.0,
        closed=closed,
        crossing=rng.uniform(10.0, 40.0) if rng.random() < 0.35 else 0.0,
        tram_lane=float(rng.choice(lanes)) if rng.random() < 0.15 else None,
        park_left=rng.random() < 0.2,
        park_right=rng.random() < 0.2,
    )


# ---------------------------------------------------------------------------------------------------------------
# Background: sky, ground, facades


def draw_sky(s):
    rng = s.rng
    if s.sunny:
        top, low = jitter(rng, (65, 115, 185), 12), jitter(rng, (170, 192, 218), 10)
    else:  # overcast: the whitish gray that most Cityscapes skies are
        top, low = jitter(rng, (170, 174, 182), 12), jitter(rng, (208, 208, 212), 8)
    t = np.clip(np.arange(s.height, dtype=np.float32) / max(s.horizon, 1.0), 0, 1) ** rng.uniform(0.6, 1.4)
    s.image[:] = (top * (1 - t)[:, None] + low * t[:, None])[:, None, :]
    clouds = np.clip(smooth_noise(rng, (s.height, s.width), s.width / 10) - rng.uniform(0.0, 1.0), 0, 1)
    s.image += (clouds * rng.uniform(0.2, 0.6))[..., None] * (235.0 - s.image)
    s.label[:] = SKY


def draw_ground(s, st):
    """Grass everywhere below the horizon, then the road, parking strips, markings and sidewalks on top."""
    rng = s.rng
    s.fill([rect(-1, s.horizon, s.width + 1, s.height + 1)], pick(rng, TERRAIN_COLORS), TERRAIN)
    road_color = pick(rng, ROAD_COLORS, 6)
    s.fill([s.ground(st.road_left, st.road_right, NEAR, st.z_end)], road_color, ROAD)
    for side in (-1, 1):
        width = st.parking(side)
        if width:
            curb = st.curb(side)
            s.fill([s.ground(curb, curb - side * width, NEAR, st.z_end)], jitter(rng, road_color, 8, 0.2), PARKING)
    draw_markings(s, st)
    for side in (-1, 1):
        curb, walk = st.curb(side), st.walk(side)
        color = pick(rng, SIDEWALK_COLORS)
        s.fill([s.ground(curb, walk, NEAR, st.z_end)], color, SIDEWALK)
        s.fill([s.ground(curb, curb + side * 0.2, NEAR, st.z_end)], jitter(rng, color * 1.15, 5), SIDEWALK)
        joints = np.arange(rng.uniform(0, 2), 30, rng.uniform(1.0, 2.5))
        s.fill(s.ground(curb, walk, joints, joints + 0.06), color * 0.8)


def draw_markings(s, st):
    rng = s.rng
    paint = jitter(rng, (215, 215, 210), 8, 0.1)
    z_stop = min(st.z_end, 150.0)
    for boundary in np.array(st.lanes[:-1]) + st.lane / 2:
        z = np.arange(1.0, z_stop, rng.uniform(6.0, 12.0))
        s.fill(s.ground(boundary - 0.07, boundary + 0.07, z, z + rng.uniform(2.0, 4.0)), paint)
    for side in (-1, 1):
        if rng.random() < 0.5:  # solid edge line
            edge = st.curb(side) - side * (st.parking(side) + 0.3)
            s.fill([s.ground(edge - 0.06, edge + 0.06, NEAR, z_stop)], paint)
    if st.crossing:
        x = np.arange(st.road_left + 0.5, st.road_right - 0.5, 1.0)
        s.fill(s.ground(x, x + 0.5, st.crossing, st.crossing + 4.0), paint)
    if st.tram_lane is not None:  # rails set into the road: still road
        x = st.tram_lane + np.array([-0.78, -0.72, 0.72, 0.78])
        s.fill(s.ground(x[[0, 2]], x[[1, 3]], NEAR, z_stop), jitter(rng, (150, 145, 140), 10))


def plan_facade(rng, z_end):
    """Segments (z0, z1, kind, height) along one side of the street, from behind the camera to its end."""
    segments, z = [], rng.uniform(-6.0, 2.0)
    while z < z_end:
        length = rng.uniform(6.0, 25.0) * (1 + max(z, 0.0) / 100)  # far buildings are a few pixels wide anyway
        kind = rng.choice(["building", "gap"], p=[0.88, 0.12])
        segments.append((z, min(z + length, z_end), kind, rng.uniform(6.0, 28.0)))
        z += length
    return segments


def draw_facade(s, x, z0, z1, height, color):
    """A building front on the plane at x (seen from the street), with floors of windows."""
    rng = s.rng
    s.fill([s.side(x, z0, rect(0, 0, z1 - z0, height))], color, BUILDING)
    s.fill([s.side(x, z0, rect(0, height - 0.5, z1 - z0, height))], color * rng.uniform(0.7, 0.9))  # cornice
    if rng.random() < 0.6:  # plinth
        s.fill([s.side(x, z0, rect(0, 0, z1 - z0, rng.uniform(0.4, 1.0)))], color * rng.uniform(0.6, 0.85))
    floor, width, gap = rng.uniform(2.8, 3.5), rng.uniform(0.8, 1.5), rng.uniform(0.8, 2.0)
    if s.pixels_per_metre(z1) * floor < 3:  # windows too small to see
        return
    glass = jitter(rng, (55, 65, 80) if rng.random() < 0.6 else (150, 165, 185), 10)
    y, dz = grid(np.arange(rng.uniform(2.5, 4.5), height - 1.5, floor),
                 np.arange(rng.uniform(0.3, 1.2), z1 - z0 - width, width + gap))
    windows = s.side(x, z0, rect(dz, y, dz + width, y + floor * rng.uniform(0.45, 0.6)))
    lit = rng.random(len(windows)) < 0.15
    s.fill(windows[~lit], glass)
    s.fill(windows[lit], jitter(rng, glass * 1.6 + 30, 10))
    if rng.random() < 0.4:  # shop windows at street level
        dz = np.arange(0.5, z1 - z0 - 4, 5.0)
        s.fill(s.side(x, z0, rect(dz, 0.5, dz + rng.uniform(2, 4), 2.8)), jitter(rng, glass * 0.8, 10))


def draw_front_building(s, x0, x1, z, height, color):
    """A building front facing the camera at depth z, from x0 to x1."""
    rng = s.rng
    s.fill([s.front(0, z, rect(x0, 0, x1, height))], color, BUILDING)
    floor, width, gap = rng.uniform(2.8, 3.5), rng.uniform(0.8, 1.5), rng.uniform(0.8, 2.0)
    if s.pixels_per_metre(z) * floor < 3:
        return
    glass = jitter(rng, (55, 65, 80) if rng.random() < 0.6 else (150, 165, 185), 10)
    y, x = grid(np.arange(rng.uniform(2.5, 4.0), height - 1.5, floor),
                np.arange(x0 + rng.uniform(0.3, 1.0), x1 - width, width + gap))
    s.fill(s.front(0, z, rect(x, y, x + width, y + floor * 0.5)), glass)


def draw_street_end(s, st):
    """A row of buildings (now and then trees) facing the camera where a closed street ends."""
    rng = s.rng
    x = st.facade_left - rng.uniform(5.0, 20.0)
    while x < st.facade_right + 20.0:
        width = rng.uniform(6.0, 18.0)
        if rng.random() < 0.2:
            draw_tree(s, x + width / 2, st.z_end + 1.0, crown=width / 2)
        else:
            draw_front_building(s, x, x + width, st.z_end, rng.uniform(5.0, 30.0), pick(rng, BUILDING_COLORS, 10))
        x += width


def draw_roadside(s, st, side):
    """One side of the street: a row of buildings with gaps, or a park, with walls, fences and hedges in front."""
    rng = s.rng
    x = st.facade(side)
    shade = 1.0 if not s.sunny or side != s.sun_side else rng.uniform(0.55, 0.75)  # the sun side lies in shadow
    segments = plan_facade(rng, st.z_end)
    # What lies behind the facade plane goes first: nearer facades hide it.
    behind = x + side * rng.uniform(15.0, 40.0)
    for z0, z1, kind, height in segments:
        if kind == "gap" or st.park(side):
            draw_facade(s, behind, z0, z1, height * 1.5, pick(rng, BUILDING_COLORS, 10) * shade)
    trees = []
    for z0, z1, kind, _ in segments:
        if kind == "gap" or st.park(side):
            trees += [(z, x + side * rng.uniform(1.0, 12.0)) for z in rng.uniform(z0, z1, rng.integers(1, 4))]
    for z, tx in sorted(trees, reverse=True):
        if z < FAR_OBJECTS:
            draw_tree(s, tx, z)
    for z0, z1, kind, height in segments:
        if kind == "building" and not st.park(side):
            draw_facade(s, x, z0, z1, height, pick(rng, BUILDING_COLORS, 10) * shade)
            if s.sunny and side == s.sun_side:
                draw_facade_shadow(s, st, side, z0, z1, height)
        if rng.random() < (0.5 if st.park(side) else 0.15):
            draw_barrier(s, x, max(z0, NEAR), z1)


def draw_facade_shadow(s, st, side, z0, z1, height):
    rng = s.rng
    reach = height * rng.uniform(0.2, 0.8)
    x0 = st.facade(side)
    x1 = float(np.clip(x0 - side * reach, st.facade_left, st.facade_right))
    dz = height * rng.uniform(-0.3, 0.3)
    s.darken(s.ground(min(x0, x1), max(x0, x1), max(z0 + dz, NEAR), max(z1 + dz, NEAR)), rng.uniform(0.5, 0.7))


def draw_barrier(s, x, z0, z1):
    """A wall, fence or hedge along the plane at x."""
    rng = s.rng
    kind = rng.choice(["wall", "fence", "hedge"])
    if kind == "wall":
        height = rng.uniform(0.8, 3.0)
        color = pick(rng, BUILDING_COLORS[:4] + ROAD_COLORS, 10)
        s.fill([s.side(x, z0, rect(0, 0, z1 - z0, height))], color, WALL)
        s.fill([s.side(x, z0, rect(0, height - 0.15, z1 - z0, height))], color * 1.2)  # coping stones
    elif kind == "fence":
        draw_fence(s, x, z0, z1, rng.uniform(1.0, 2.0), pick(rng, POLE_COLORS + [(120, 90, 60)], 10))
    else:
        points = [(dz, rng.uniform(0.8, 1.6)) for dz in np.linspace(0, z1 - z0, 12)]
        s.fill([s.side(x, z0, [(0, 0)] + points + [(z1 - z0, 0)])], pick(rng, VEGETATION_COLORS), VEGETATION)


def draw_fence(s, x, z0, z1, height, color):
    """The label covers the whole fence, the image only its posts, rails and bars: what is behind shows through."""
    rng = s.rng
    outline = s.side(x, z0, rect(0, 0, z1 - z0, height))
    cv2.fillPoly(s.label, [_fixed(outline)], FENCE, cv2.LINE_8, SHIFT)
    bars = np.arange(0, z1 - z0, rng.uniform(0.12, 0.3))
    posts = np.arange(0, z1 - z0, 2.5)
    rails = np.array([0.1, height - 0.06])
    s.fill(s.side(x, z0, rect(bars, 0, bars + 0.04, height)), color)
    s.fill(s.side(x, z0, rect(posts, 0, posts + 0.1, height)), color)
    s.fill(s.side(x, z0, rect(0, rails, z1 - z0, rails + 0.06)), color)


# ---------------------------------------------------------------------------------------------------------------
# Things in the street


def draw_tree(s, x, z, crown=None):
    """Trunk and a crown of overlapping discs of varied greens; all of it is vegetation, as in Cityscapes."""
    rng = s.rng
    crown = crown or rng.uniform(1.5, 3.5)
    trunk_height = rng.uniform(1.8, 3.5)
    trunk = rng.uniform(0.2, 0.45)
    s.fill([s.front(x, z, rect(-trunk / 2, 0, trunk / 2, trunk_height + crown / 2))],
           jitter(rng, (95, 80, 65), 12), VEGETATION)
    n = rng.integers(8, 16)
    centres = np.array([0.0, trunk_height + crown * 0.9]) + rng.normal(0, 1, (n, 2)) * crown * np.array([0.5, 0.4])
    discs = s.front(x, z, centres[:, None] + unit_polygon(12, 0.0) * crown * rng.uniform(0.35, 0.65, (n, 1, 1)))
    base = pick(rng, VEGETATION_COLORS)
    for shade in np.array_split(discs, 3):  # clumps of leaves in three shades of the tree's green
        s.fill(shade, jitter(rng, base, 12), VEGETATION)


def draw_vehicle(s, x, z, kind):
    """A car, truck or bus as a box: its face towards the camera, the side towards the street's middle, wheels."""
    rng = s.rng
    if kind == "car":
        width, height, length = rng.uniform(1.65, 1.9), rng.uniform(1.35, 1.6), rng.uniform(3.9, 4.9)
        color, label_id = pick(rng, CAR_COLORS, 8), CAR
    elif kind == "truck":
        width, height, length = rng.uniform(2.2, 2.5), rng.uniform(2.6, 3.8), rng.uniform(6.0, 10.0)
        color, label_id = pick(rng, CAR_COLORS[:5] + BUS_COLORS, 8), TRUCK
    elif kind == "bus":
        width, height, length = 2.55, rng.uniform(3.0, 3.3), rng.uniform(11.0, 13.0)
        color, label_id = pick(rng, BUS_COLORS, 8), BUS
    else:  # a tram: drawn like a bus, longer and lower
        width, height, length = 2.4, rng.uniform(2.9, 3.3), rng.uniform(25.0, 32.0)
        color, label_id = pick(rng, TRAM_COLORS, 8), TRAM
    glass = jitter(rng, (45, 50, 60) if rng.random() < 0.7 else (140, 155, 175), 8)
    s.darken(s.ground(x - width / 2 - 0.1, x + width / 2 + 0.1, z - 0.3, z + length), rng.uniform(0.35, 0.55))
    near_side = x + width / 2 if x + width / 2 < -0.1 else x - width / 2 if x - width / 2 > 0.1 else None
    if near_side is not None:
        draw_vehicle_side(s, near_side, z, length, height, color * rng.uniform(0.75, 0.95), glass, kind, label_id)
    draw_vehicle_back(s, x, z, width, height, color, glass, kind, label_id)


def draw_wheel(s, x, z, radius, label_id):
    rng = s.rng
    tyre = regular_polygon(12, radius) + (0, radius)
    s.fill([s.side(x, z, tyre)], jitter(rng, (30, 30, 32), 5), label_id)
    s.fill([s.side(x, z, regular_polygon(8, radius * 0.5) + (0, radius))], jitter(rng, (120, 120, 125), 15))


def draw_vehicle_side(s, x, z, length, height, color, glass, kind, label_id):
    scale = np.array([length, height])
    if kind == "car":
        s.fill([s.side(x, z, CAR_SIDE * scale)], color, label_id)
        s.fill([s.side(x, z, CAR_SIDE_WINDOW * scale)], glass)
        wheels = (0.17, 0.83)
    elif kind == "truck":
        s.fill([s.side(x, z, rect(0, 0.22, 0.74, 1.0) * scale)], color, label_id)
        s.fill([s.side(x, z, rect(0.76, 0.12, 1.0, 0.78) * scale)], color * 0.8, label_id)
        s.fill([s.side(x, z, rect(0.8, 0.5, 0.97, 0.74) * scale)], glass)
        wheels = (0.12, 0.26, 0.88)
    else:
        s.fill([s.side(x, z, rect(0, 0.08, 1.0, 1.0) * scale)], color, label_id)
        f = np.arange(0.03, 0.95, 0.095)
        s.fill(s.side(x, z, rect(f, 0.5, f + 0.085, 0.88) * scale), glass)
        wheels = (0.15, 0.8)
    for f in wheels:
        draw_wheel(s, x, z + f * length, min(0.5, 0.22 * height), label_id)


def draw_vehicle_back(s, x, z, width, height, color, glass, kind, label_id):
    rng = s.rng
    scale = np.array([width, height])
    tyres = [s.front(x, z, rect(sign * 0.32, 0, sign * 0.47, 0.22) * scale) for sign in (-1, 1)]
    s.fill(tyres, jitter(rng, (30, 30, 32), 5), label_id)
    if kind == "car":
        s.fill([s.front(x, z, CAR_BACK * scale)], color, label_id)
        s.fill([s.front(x, z, CAR_BACK_WINDOW * scale)], glass)
    else:
        s.fill([s.front(x, z, rect(-0.5, 0.12, 0.5, 1.0) * scale)], color, label_id)
        if kind in ("bus", "tram"):
            s.fill([s.front(x, z, rect(-0.4, 0.7, 0.4, 0.92) * scale)], glass)
        else:
            s.fill([s.front(x, z, rect(-0.02, 0.22, 0.02, 0.98) * scale)], color * 0.7)  # doors of the cargo box
    lamp = (230, 40, 35) if rng.random() < 0.3 else (150, 30, 30)
    s.fill([s.front(x, z, rect(sign * 0.36, 0.42, sign * 0.48, 0.52) * scale) for sign in (-1, 1)], lamp)
    s.fill([s.front(x, z, rect(-0.12, 0.28, 0.12, 0.36) * scale)], jitter(rng, (220, 220, 215), 5))  # plate


def person_shapes(rng, height):
    """Front view of a person, in metres around the feet: (legs, torso and arms, head) polygons."""
    h = height
    stride = rng.uniform(-0.12, 0.12)
    legs = [rect(-0.17, 0, -0.03, 0.48 * h) + [[stride, 0], [stride, 0], [0, 0], [0, 0]],
            rect(0.03, 0, 0.17, 0.48 * h) - [[stride, 0], [stride, 0], [0, 0], [0, 0]]]
    torso = np.array([(-0.17, 0.45 * h), (0.17, 0.45 * h), (0.22, 0.81 * h), (0.14, 0.84 * h), (-0.14, 0.84 * h),
                      (-0.22, 0.81 * h)])
    swing = rng.uniform(-0.08, 0.08)
    arms = [np.array([(sign * 0.17, 0.8 * h), (sign * 0.25, 0.8 * h), (sign * 0.27 + swing, 0.45 * h),
                      (sign * 0.19 + swing, 0.45 * h)]) for sign in (-1, 1)]
    head = regular_polygon(12, 0.105) + (0, h - 0.11)
    return legs, [torso] + arms, head


def draw_person(s, x, z, label_id=PERSON):
    rng = s.rng
    height = rng.uniform(1.55, 1.95) if rng.random() > 0.1 else rng.uniform(1.0, 1.35)
    legs, body, head = person_shapes(rng, height)
    s.fill([s.front(x, z, p) for p in legs], pick(rng, CLOTHES_COLORS, 10), label_id)
    s.fill([s.front(x, z, p) for p in body], pick(rng, CLOTHES_COLORS, 10), label_id)
    s.fill([s.front(x, z, head)], pick(rng, SKIN_COLORS, 8), label_id)
    s.fill([s.front(x, z, head[5:11])], pick(rng, CLOTHES_COLORS[:3] + [(110, 80, 50), (200, 180, 120)], 8))  # hair


def side_view_points(s, x, z, direction, points):
    """Pixels of named points (across, up) of something seen from the side, facing `direction` (+1: right)."""
    return {name: s.front(x, z, [(direction * dx, dy)])[0] for name, (dx, dy) in points.items()}


def draw_bicycle(s, x, z, direction, with_rider):
    """Side view of a bicycle crossing the view (moving along x), with or without a rider."""
    rng = s.rng
    k = s.pixels_per_metre(z)
    p = side_view_points(s, x, z, direction, {"rear": (-0.52, 0.34), "front": (0.52, 0.34), "foot": (0.0, 0.3),
                                              "seat": (-0.18, 0.88), "head": (0.38, 0.92), "hands": (0.34, 1.05)})
    frame = pick(rng, CLOTHES_COLORS, 10)
    for a, b in [("rear", "foot"), ("rear", "seat"), ("seat", "foot"), ("foot", "head"), ("seat", "head"),
                 ("head", "front"), ("head", "hands")]:
        s.line(p[a], p[b], 0.04 * k, frame, BICYCLE)
    for hub in ("rear", "front"):
        s.ring(p[hub], 0.34 * k, 0.05 * k, jitter(rng, (30, 30, 30), 5), BICYCLE)
    if with_rider:
        draw_rider(s, x, z, direction, p)


def draw_motorcycle(s, x, z, direction, with_rider):
    """Side view of a motorcycle crossing the view: thick tyres, a solid body, and usually a rider."""
    rng = s.rng
    k = s.pixels_per_metre(z)
    p = side_view_points(s, x, z, direction, {"rear": (-0.7, 0.32), "front": (0.7, 0.32), "foot": (-0.05, 0.38),
                                              "head": (0.5, 0.95), "hands": (0.42, 1.05)})
    body = [(-0.8, 0.6), (-0.25, 0.78), (0.3, 0.92), (0.55, 0.95), (0.62, 0.6), (0.25, 0.25), (-0.35, 0.35)]
    s.fill([s.front(x, z, np.array(body) * (direction, 1))], pick(rng, CAR_COLORS, 10), MOTORCYCLE)
    for hub in ("rear", "front"):
        s.ring(p[hub], 0.28 * k, 0.1 * k, jitter(rng, (25, 25, 25), 5), MOTORCYCLE)
    s.line(p["head"], p["hands"], 0.05 * k, (40, 40, 40), MOTORCYCLE)
    if with_rider:
        draw_rider(s, x, z, direction, p)


def draw_rider(s, x, z, direction, p):
    """A person sitting on a two-wheeler, hands on the bar `p["hands"]`, a foot on `p["foot"]`."""
    rng = s.rng
    k = s.pixels_per_metre(z)
    hip, shoulder, knee = side_view_points(s, x, z, direction, {
        "hip": (-0.15, 0.95), "shoulder": (0.12, 1.5), "knee": (0.08, 0.62)}).values()
    clothes = pick(rng, CLOTHES_COLORS, 10)
    s.line(hip, knee, 0.13 * k, clothes * 0.8, RIDER)
    s.line(knee, p["foot"], 0.11 * k, clothes * 0.8, RIDER)
    s.line(hip, shoulder, 0.3 * k, clothes, RIDER)
    s.line(shoulder, p["hands"], 0.08 * k, clothes, RIDER)
    s.fill([s.front(x, z, regular_polygon(12, 0.11) + (direction * 0.2, 1.67))], pick(rng, SKIN_COLORS, 8), RIDER)


def draw_sign(s, x, y, z):
    """A traffic sign facing the camera, centred at height y."""
    rng = s.rng
    red, white, blue = jitter(rng, (200, 30, 35), 10), jitter(rng, (230, 230, 228), 6), jitter(rng, (30, 80, 170), 10)
    kind = rng.choice(["round", "mandatory", "warning", "yield", "stop", "square", "direction"])
    r = rng.uniform(0.28, 0.4)
    shapes = {
        "round": (regular_polygon(20, r), red, regular_polygon(20, r * 0.75), white),
        "mandatory": (regular_polygon(20, r), blue, rect(-0.08, -r * 0.6, 0.08, r * 0.4), white),
        "warning": (regular_polygon(3, r * 1.2, np.pi / 2), red, regular_polygon(3, r * 0.8, np.pi / 2), white),
        "yield": (regular_polygon(3, r * 1.2, -np.pi / 2), red, regular_polygon(3, r * 0.8, -np.pi / 2), white),
        "stop": (regular_polygon(8, r, np.pi / 8), red, regular_polygon(8, r * 0.85, np.pi / 8), red * 1.1),
        "square": (regular_polygon(4, r * 1.3, np.pi / 4), blue, rect(-0.1, -0.2, 0.1, 0.2), white),
        "direction": (rect(-0.6, -0.2, 0.6, 0.2), pick(rng, [(230, 230, 225), (240, 200, 40), (40, 120, 70)]),
                      rect(-0.5, -0.05, 0.4, 0.05), jitter(rng, (30, 30, 30), 5)),
    }
    outer, outer_color, inner, inner_color = shapes[kind]
    s.fill([s.front(x, z, outer + (0, y))], outer_color, TRAFFIC_SIGN)
    s.fill([s.front(x, z, inner + (0, y))], inner_color)


def draw_traffic_light(s, x, y, z):
    """A housing with three lamps, one of them lit, its bottom at height y."""
    rng = s.rng
    housing = jitter(rng, (40, 40, 42), 8) if rng.random() < 0.8 else jitter(rng, (200, 170, 60), 10)
    s.fill([s.front(x, z, rect(-0.15, 0, 0.15, 0.85) + (0, y))], housing, TRAFFIC_LIGHT)
    lit = rng.integers(3)
    colors = [(240, 45, 35), (250, 185, 40), (60, 230, 130)]
    for i, color in enumerate(colors):
        lamp = color if i == lit else np.array(color) * 0.25 + 30
        s.fill([s.front(x, z, regular_polygon(10, 0.085) + (0, y + 0.68 - i * 0.26))], lamp)


def draw_pole(s, x, z, side):
    """A pole at the curb; it may carry a sign, a traffic light or a street lamp reaching over the road."""
    rng = s.rng
    height = rng.uniform(3.0, 9.0)
    radius = rng.uniform(0.05, 0.12)
    color = pick(rng, POLE_COLORS, 10)
    s.fill([s.front(x, z, rect(-radius, 0, radius, height))], color, POLE)
    k = s.pixels_per_metre(z)
    if height > 6 and rng.random() < 0.6:  # street lamp: an arm over the road and a lamp head, all pole
        top, end = s.front(x, z, [(0, height), (-side * rng.uniform(1.0, 2.5), height + 0.3)])
        s.line(top, end, 2 * radius * k, color, POLE)
        s.line(end, end + (0, 0.1 * k), 0.4 * k, color * 0.8, POLE)
    roll = rng.random()
    if roll < 0.4:
        draw_sign(s, x, rng.uniform(2.2, max(2.3, height - 0.4)), z - 0.05)
    elif roll < 0.75 and height > 3.2:
        draw_traffic_light(s, x - side * (radius + 0.15), rng.uniform(2.2, height - 0.9), z - 0.05)


def draw_prop(s, x, z):
    """Street furniture Cityscapes ignores: bollards, bins, advertising columns (static), containers (dynamic)."""
    rng = s.rng
    kind = rng.choice(["bollard", "bin", "column", "container"], p=[0.35, 0.3, 0.15, 0.2])
    if kind == "bollard":
        s.fill([s.front(x, z, rect(-0.06, 0, 0.06, 0.9))], pick(rng, POLE_COLORS + [(200, 60, 50)], 10), STATIC)
    elif kind == "bin":
        s.fill([s.front(x, z, rect(-0.25, 0, 0.25, 0.95))], pick(rng, POLE_COLORS + [(220, 120, 40)], 10), STATIC)
    elif kind == "column":
        s.fill([s.front(x, z, rect(-0.6, 0, 0.6, 3.0))], pick(rng, BUILDING_COLORS, 15), STATIC)
        s.fill([s.front(x, z, rect(-0.7, 3.0, 0.7, 3.3))], jitter(rng, (50, 80, 60), 10), STATIC)
        posters = [s.front(x, z, rect(-0.5 + i * 0.34, 0.8, -0.2 + i * 0.34, 2.6)) for i in range(3)]
        for poster in posters:
            s.fill([poster], rng.uniform(20, 250, 3))
    else:
        color = pick(rng, [(50, 80, 60), (90, 90, 95), (40, 60, 120), (150, 110, 50)], 10)
        s.fill([s.front(x, z, rect(-0.6, 0.12, 0.6, 1.3))], color, DYNAMIC)
        s.fill([s.front(x, z, rect(sign * 0.5, 0, sign * 0.4, 0.12)) for sign in (-1, 1)], (30, 30, 30), DYNAMIC)


def lane_is_free(taken, x, z0, z1):
    return all(abs(x - tx) > 1.5 or z1 < t0 or z0 > t1 for tx, t0, t1 in taken)


def plan_objects(s, st):
    """(depth, draw) for everything standing in the street; drawn from far to near, nearer things hide farther."""
    rng = s.rng
    items, taken = [], []
    z_max = min(FAR_OBJECTS, st.z_end - 2.0)

    def vehicle(x, z, kind):
        length = {"car": 4.9, "truck": 10.0, "bus": 13.0, "tram": 32.0}[kind]
        if z < z_max and lane_is_free(taken, x, z - 1.0, z + length + 1.0):
            taken.append((x, z, z + length))
            items.append((z, partial(draw_vehicle, s, x, z, kind)))

    for lane_x in st.lanes:
        for _ in range(rng.integers(0, 3)):
            z0 = 10.0 if abs(lane_x) < st.lane / 2 else 6.0  # the car we ride in is in the lane at x = 0
            kind = rng.choice(["car", "truck", "bus"], p=[0.86, 0.07, 0.07])
            vehicle(lane_x + rng.normal(0, 0.2), float(np.exp(rng.uniform(np.log(z0), np.log(z_max)))), kind)
    if st.tram_lane is not None and rng.random() < 0.7:
        vehicle(st.tram_lane, rng.uniform(10.0, 50.0), "tram")
    for side in (-1, 1):
        if rng.random() < 0.5:  # a row of parked cars along the curb
            x = st.curb(side) - side * (max(st.parking(side), 2.2) / 2)
            z = rng.uniform(0.0, 20.0)
            while z < z_max:
                if rng.random() < 0.7:
                    vehicle(x + rng.normal(0, 0.1), z, "car" if rng.random() < 0.96 else "truck")
                z += rng.uniform(5.0, 9.0)
    for side in (-1, 1):
        curb, walk = st.curb(side), st.walk(side)
        for z in np.arange(rng.uniform(3.0, 15.0), z_max, rng.uniform(12.0, 35.0)):
            items.append((z, partial(draw_pole, s, curb + side * 0.4, z, side)))
        if rng.random() < 0.5:  # a row of trees on the sidewalk
            for z in np.arange(rng.uniform(3.0, 12.0), z_max, rng.uniform(7.0, 16.0)):
                items.append((z, partial(draw_tree, s, walk - side * rng.uniform(0.6, 1.0), z)))
        for _ in range(rng.poisson(1.5)):
            z = rng.uniform(4.0, 40.0)
            items.append((z, partial(draw_prop, s, curb + side * rng.uniform(0.3, 1.2), z)))
        if rng.random() < 0.35:  # parked bicycles or motorcycles, seen from the side
            z, draw_two_wheeler = rng.uniform(5.0, 25.0), draw_bicycle if rng.random() < 0.7 else draw_motorcycle
            for i in range(rng.integers(1, 5)):
                items.append((z + 0.9 * i, partial(draw_two_wheeler, s, walk - side * 1.0, z + 0.9 * i, side, False)))
    for _ in range(rng.poisson(4.0)):
        side = rng.choice([-1, 1])
        x = st.curb(side) + side * rng.uniform(0.3, abs(st.walk(side) - st.curb(side)) - 0.3)
        z = float(np.exp(rng.uniform(np.log(4.0), np.log(60.0))))
        items.append((z, partial(draw_person, s, x, z)))
        if rng.random() < 0.3:
            items.append((z + 0.4, partial(draw_person, s, x + rng.uniform(-0.7, 0.7), z + 0.4)))
    if st.crossing:
        for _ in range(rng.integers(0, 4)):
            x, z = rng.uniform(st.road_left, st.road_right), st.crossing + rng.uniform(0.5, 3.5)
            items.append((z, partial(draw_person, s, x, z)))
    for draw_two_wheeler, chance in ((draw_bicycle, 0.35), (draw_motorcycle, 0.25)):
        if rng.random() < chance:  # crossing the street, with a rider
            x, z = rng.uniform(st.road_left + 1, st.road_right - 1), rng.uniform(8.0, 40.0)
            items.append((z, partial(draw_two_wheeler, s, x, z, rng.choice([-1, 1]), True)))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Camera artefacts and the ids Cityscapes ignores


def draw_ego_vehicle(s):
    """The hood of the car the camera rides in: a band arching over the bottom of the image."""
    rng = s.rng
    top = s.height * rng.uniform(0.06, 0.14)
    xs = np.linspace(-0.05, 1.05, 40) * s.width
    ys = s.height - top * (1 - 0.6 * ((xs - s.width * rng.uniform(0.4, 0.6)) / (0.6 * s.width)) ** 2)
    outline = np.concatenate([np.stack([xs, ys], 1), [(xs[-1], s.height + 1), (xs[0], s.height + 1)]])
    color = pick(rng, CAR_COLORS, 8, 0.3)
    s.fill([outline], color, EGO_VEHICLE)
    s.fill([np.concatenate([np.stack([xs, ys + 0.15 * top], 1), np.stack([xs, ys + 0.3 * top], 1)[::-1]])],
           color * 0.6 + 90)  # highlight along the hood's edge


def draw_rectification_border(s):
    """Dark wedges at the left and right edges, where undistorting the camera image leaves no data."""
    rng = s.rng
    ys = np.linspace(0, s.height, 20)
    bend = ((ys - s.height / 2) / (s.height / 2)) ** 2
    color = jitter(rng, (15, 15, 18), 4)
    for edge in (0, s.width):
        width = s.width * (rng.uniform(0.0, 0.006) + rng.uniform(0.0, 0.02) * bend)
        xs = np.abs(edge - width)
        s.fill([np.concatenate([np.stack([xs, ys], 1), [(edge, s.height), (edge, 0)]])], color,
               RECTIFICATION_BORDER)


def apply_textures(s):
    """Modulate brightness per class with noise of three grains, so surfaces are not flat colors."""
    rng = s.rng
    scale = s.width / 512
    amounts = np.zeros((3, 256), np.float32)
    for label_id, amount in TEXTURE.items():
        amounts[:, label_id] = amount
    gain = np.ones((s.height, s.width), np.float32)
    for amount, cell in zip(amounts, (1.0, 6.0, 30.0), strict=True):
        gain += amount[s.label] * smooth_noise(rng, (s.height, s.width), cell * scale)
    s.image *= gain[..., None]


def mark_ignored_pixels(s):
    """Label-only: a thin out-of-roi frame at the image border and a few unlabeled specks."""
    rng = s.rng
    for _ in range(rng.integers(1, 5)):
        centre = rng.uniform((0, 0), (s.width, s.height))
        outline = centre + regular_polygon(6, rng.uniform(1.0, 4.0) * s.width / 512, rng.uniform(0, 1))
        cv2.fillPoly(s.label, [_fixed(outline)], UNLABELED, cv2.LINE_8, SHIFT)
    band = max(1, round(s.height / 256))
    s.label[:band] = OUT_OF_ROI
    s.label[-band:] = OUT_OF_ROI
    s.label[:, :band] = OUT_OF_ROI
    s.label[:, -band:] = OUT_OF_ROI


def camera_response(s):
    """Exposure, white balance, gamma, vignetting, lens blur and sensor noise; returns the uint8 RGB image."""
    rng = s.rng
    image = s.image * rng.uniform(0.65, 1.25) * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    image = 255 * cv2.pow(np.clip(image, 0, 255) / 255, rng.uniform(0.8, 1.2))
    x = (np.arange(s.width, dtype=np.float32) - s.width / 2) / s.width
    y = (np.arange(s.height, dtype=np.float32) - s.height / 2) / s.width
    image *= (1 - rng.uniform(0.0, 1.0) * (x[None, :] ** 2 + y[:, None] ** 2))[..., None]
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9) * s.width / 512)
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2.0, 7.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def draw_scene(rng, size):
    """One street scene: (RGB uint8 image (H, W, 3), Cityscapes label ids uint8 (H, W))."""
    s = Scene(rng, size)
    st = plan_street(rng)
    draw_sky(s)
    draw_ground(s, st)
    if st.closed:
        draw_street_end(s, st)
    for side in (-1, 1):
        draw_roadside(s, st, side)
    for _, draw in sorted(plan_objects(s, st), key=lambda item: -item[0]):
        draw()
    if rng.random() < 0.5:
        draw_ego_vehicle(s)
    if rng.random() < 0.5:
        draw_rectification_border(s)
    apply_textures(s)
    mark_ignored_pixels(s)
    return camera_response(s), s.label


# ---------------------------------------------------------------------------------------------------------------
# Files


def file_stems(split, n):
    """Cityscapes-style (city, stem) of each image of a split: cities in turn, a new sequence number for each."""
    cities = SPLIT_CITIES[split]
    stems = []
    for i in range(n):
        city = cities[i % len(cities)]
        stems.append((city, f"{city}_{i // len(cities):06d}_{FRAME:06d}"))
    return stems


def image_path(root, split, city, stem):
    return Path(root) / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"


def label_path(root, split, city, stem):
    return Path(root) / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"


def write_atomically(path, data):
    """Write bytes through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_png(path, array):
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    write_atomically(path, encoded.tobytes())


def marker_text(n_train, n_val, size, seed):
    return (
        "Synthetic street scenes in the Cityscapes layout, written by synthetic.py: not real Cityscapes data.\n"
        f"version: {GENERATOR_VERSION}\nseed: {seed}\ntrain: {n_train}\nval: {n_val}\nsize: {size[0]}x{size[1]}\n"
    )


def check_ours(root):
    """Refuse to write into a non-empty folder that no run of this generator made: it may hold real data."""
    root = Path(root)
    if not root.exists() or (root / MARKER).exists() or (root / PARTIAL_MARKER).exists():
        return
    if any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and has no {MARKER} file, so it was not made by synthetic.py (it may hold the real "
            f"Cityscapes data); refusing to write into it. Choose an empty or new folder for the synthetic data set.")


def check_arguments(n_train, n_val, size, seed):
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min(n_train, n_val) < 0:
        raise ValueError(f"image counts must be >= 0, got train={n_train}, val={n_val}")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be two integers H, W of at least 16 pixels, got {tuple(size)}")


def remove_stale_files(root, written):
    """Delete what earlier runs left in our city folders and this run did not write: images and labels of a
    larger data set, temporary files of an interrupted one."""
    for split, cities in SPLIT_CITIES.items():
        for city in cities:
            for folder, pattern in (("leftImg8bit", "*_leftImg8bit.png"), ("gtFine", "*_gtFine_labelIds.png")):
                for path in (Path(root) / folder / split / city).glob(pattern):
                    if path not in written:
                        path.unlink()
                for path in (Path(root) / folder / split / city).glob(".*.tmp"):
                    path.unlink()


def generate(root, n_train=48, n_val=16, size=(256, 512), seed=0, progress=True) -> None:
    """Write `n_train` + `n_val` synthetic scenes of `size` (H, W) under `root` in the Cityscapes layout.

    Images go to root/leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png, label ids to
    root/gtFine/... _gtFine_labelIds.png. The marker root/SYNTHETIC is written last: a folder without it holds an
    interrupted run. Refuses a non-empty folder this generator did not make.
    """
    root = Path(root)
    size = tuple(int(v) for v in size)
    check_arguments(n_train, n_val, size, seed)
    check_ours(root)
    root.mkdir(parents=True, exist_ok=True)
    write_atomically(root / PARTIAL_MARKER, b"synthetic.py is writing this folder\n")
    (root / MARKER).unlink(missing_ok=True)
    jobs = [(split, index, city, stem) for split, n in (("train", n_train), ("val", n_val))
            for index, (city, stem) in enumerate(file_stems(split, n))]
    written = set()
    for split, index, city, stem in tqdm(jobs, desc=f"synthetic data -> {root}", disable=not progress):
        # One generator per image: every image depends only on (seed, split, index), not on the counts.
        rng = np.random.default_rng([seed, list(SPLIT_CITIES).index(split), index])
        image, label = draw_scene(rng, size)
        paths = image_path(root, split, city, stem), label_path(root, split, city, stem)
        write_png(paths[0], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_png(paths[1], label)
        written.update(paths)
    remove_stale_files(root, written)
    write_atomically(root / MARKER, marker_text(n_train, n_val, size, seed).encode())
    (root / PARTIAL_MARKER).unlink(missing_ok=True)


def ensure_synthetic(root, n_train, n_val, size, seed=0) -> bool:
    """Generate the data set unless root already holds one made with these settings; True if it generated.

    Never writes into a non-empty folder without the marker (it may hold the real data).
    """
    marker = Path(root) / MARKER
    size = tuple(int(v) for v in size)
    check_arguments(n_train, n_val, size, seed)
    if marker.exists() and marker.read_text() == marker_text(n_train, n_val, size, seed):
        return False
    check_ours(root)
    print(f"generating the synthetic data set in {root} ({n_train} train + {n_val} val images of {size[0]}x{size[1]},"
          f" seed {seed})", flush=True)
    generate(root, n_train, n_val, size, seed)
    return True


def prepare_data(cfg, ddp):
    """Make sure the config's dataset exists: generate the synthetic one (rank 0 only, once) if it asks for it."""
    if cfg.synthetic:
        if ddp.main:
            ensure_synthetic(cfg.data_root, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_size, cfg.seed)
        ddp.barrier()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic street scenes in the Cityscapes layout.")
    parser.add_argument("--root", default="data/synthetic", help="output folder (must be new, empty or synthetic)")
    parser.add_argument("--train", type=int, default=48, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"), help="image size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        generate(args.root, args.train, args.val, args.size, args.seed, progress=not args.quiet)
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.train} train + {args.val} val images to {args.root} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

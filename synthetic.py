"""Synthetic street scenes in the exact Cityscapes layout and label encoding: the real data needs a login.

A pinhole camera looks down a street of facades, trees, walls, fences, poles with signs and lights, vehicles,
pedestrians and riders, plus the ids Cityscapes ignores. Classes share colors on purpose (greys of road, sidewalk,
wall, facade, car and pole; greens of trees and grass), so shape, place and context must label a pixel. Each image
depends only on (seed, split, index).

    python synthetic.py --root data/synthetic --train 48 --val 16 --size 256 512 --seed 0
"""

import argparse
import shutil
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
from tqdm import tqdm

from checkpoint import write_atomically
from cityscapes import LABELS

ID = {label.name: label.id for label in LABELS}  # official label ids by name; the loader maps them to train ids
GENERATOR_VERSION = 2  # part of the marker: bump it when the drawing changes, so old data sets get regenerated
SPLIT_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}
MARKER, PARTIAL_MARKER = "SYNTHETIC", "SYNTHETIC.partial"  # the partial one marks an interrupted run as ours
NEAR, FAR = 0.5, 90.0  # metres: nearer points are projected as if here (no flips), farther objects are not drawn
SHIFT = 3  # fractional bits of the pixel coordinates given to cv2: small, far objects keep their shape

ROADS = [(75, 75, 80), (100, 100, 104), (125, 123, 125), (90, 85, 85)]
BUILDINGS = [(125, 125, 125), (170, 168, 164), (195, 180, 155), (215, 205, 182), (150, 85, 65), (85, 85, 90),
             (225, 225, 220), (220, 200, 145), (200, 160, 150), (140, 150, 160)]
POLES = [(120, 120, 120), (160, 160, 158), (70, 80, 72), (90, 90, 95)]
PALETTES = {  # base RGB colors, jittered per object; greys and greens are shared by several classes on purpose
    "road": ROADS, "sidewalk": [(140, 138, 135), (170, 160, 145), (150, 105, 95), (115, 115, 118)],
    "building": BUILDINGS, "wall": BUILDINGS[:4] + ROADS, "pole": POLES, "prop": POLES + [(200, 60, 50)],
    "vegetation": [(60, 95, 40), (85, 115, 50), (45, 70, 35), (110, 135, 70)],
    "terrain": [(110, 130, 70), (135, 125, 90), (95, 115, 60), (150, 140, 110)],
    "vehicle": [(195, 195, 200), (150, 150, 155), (100, 100, 105), (40, 40, 45), (230, 230, 230), (35, 50, 95),
                (145, 30, 30), (65, 85, 125), (95, 70, 50), (180, 172, 150)],
    "clothes": [(30, 30, 35), (60, 60, 70), (120, 120, 125), (40, 50, 90), (150, 40, 40), (200, 200, 195)],
    "skin": [(230, 190, 160), (200, 150, 115), (150, 100, 70), (95, 65, 45)],
}
TEXTURE = {  # how strongly noise of three grains (fine, blotches, stains) modulates the brightness of a class
    "road": (0.05, 0.04, 0.05), "parking": (0.06, 0.05, 0.05), "sidewalk": (0.05, 0.06, 0.06), "car": (0.02, 0.03, 0),
    "building": (0.03, 0.05, 0.05), "wall": (0.05, 0.08, 0.06), "vegetation": (0.35, 0.2, 0.1),
    "terrain": (0.22, 0.12, 0.12), "ego vehicle": (0.02, 0.04, 0.0)}
VEHICLES = {"car": ((1.65, 1.9), (1.35, 1.6), (3.9, 4.9)), "truck": ((2.2, 2.5), (2.6, 3.8), (6.0, 10.0)),
            "bus": ((2.5, 2.6), (3.0, 3.3), (11.0, 13.0))}  # (width, height, length) ranges in metres
# Outlines in fractions of a car's box, from behind (across -0.5..0.5, up) and from the side (along 0..1, up).
CAR_BACK = [(-0.5, 0.2), (0.5, 0.2), (0.5, 0.6), (0.45, 0.66), (0.37, 0.97), (-0.37, 0.97), (-0.45, 0.66), (-0.5, 0.6)]
CAR_SIDE = [(0, 0.2), (1, 0.2), (1, 0.52), (0.97, 0.6), (0.78, 0.66), (0.62, 1), (0.27, 1), (0.13, 0.66), (0, 0.55)]
# A two-wheeler's frame from the side, in metres: hub, crank, saddle, head, hub; head, handlebar.
FRAME = [[(-0.52, 0.34), (0.0, 0.3), (-0.18, 0.88), (0.38, 0.92), (0.52, 0.34)], [(0.38, 0.92), (0.34, 1.05)]]
RED, WHITE, BLUE = (200, 30, 35), (230, 230, 228), (30, 80, 170)
SIGNS = [(20, RED, WHITE), (20, BLUE, BLUE), (3, RED, WHITE), (4, WHITE, (240, 200, 40))]  # corners, rim, face
PROPS = [("static", 0.06, 0.9), ("static", 0.25, 0.95), ("static", 0.5, 2.6), ("dynamic", 0.5, 1.2)]  # half-width


def rect(x0, y0, x1, y1):
    """Corners of axis-aligned rectangles: (4, 2) for numbers, (..., 4, 2) for arrays of bounds."""
    x0, y0, x1, y1 = np.broadcast_arrays(*(np.asarray(bound, np.float64) for bound in (x0, y0, x1, y1)))
    return np.stack([x0, y0, x1, y0, x1, y1, x0, y1], -1).reshape(*x0.shape, 4, 2)


def polygon(corners, radius, rotation=0.0):
    """A regular polygon (a circle, with many corners) around the origin; an array of radii gives one per radius."""
    angle = rotation + 2 * np.pi * np.arange(corners) / corners
    return radius * np.stack([np.cos(angle), np.sin(angle)], -1)


class Scene:
    """One image being drawn: float RGB, label ids, and a camera. World: metres, x right, y up, z ahead."""

    def __init__(self, rng, size):
        self.rng, (self.height, self.width), self.sunny = rng, size, rng.random() < 0.5
        self.image, self.label = np.zeros((*size, 3), np.float32), np.zeros(size, np.uint8)
        # A camera fixed on the car, as Cityscapes' is: its focal length, centre, horizon and height vary little.
        self.focal, self.centre = self.width * rng.uniform(1.0, 1.1), self.width * rng.uniform(0.47, 0.53)
        self.horizon, self.eye = self.height * rng.uniform(0.4, 0.46), rng.uniform(1.25, 1.4)  # eye: camera height

    def pick(self, palette, amount=12.0):
        """A color near one of a palette's (or near a given color): a random brightness and a shift per channel."""
        color = PALETTES[palette][self.rng.integers(len(PALETTES[palette]))] if isinstance(palette, str) else palette
        return np.asarray(color, np.float64) * self.rng.uniform(0.85, 1.15) + self.rng.normal(0.0, amount, 3)

    def noise(self, cell):
        """Zero-mean, unit-variance noise over the image that varies smoothly over about `cell` pixels."""
        coarse = self.rng.standard_normal((int(self.height / cell) + 3, int(self.width / cell) + 3), dtype=np.float32)
        size = (int(coarse.shape[1] * cell), int(coarse.shape[0] * cell))
        field = cv2.resize(coarse, size, interpolation=cv2.INTER_CUBIC)[:self.height, :self.width]
        return (field - field.mean()) / (field.std() + 1e-6)

    def project(self, x, y, z):
        """World points (arrays of one shape) -> pixels: that shape with a last axis (u, v)."""
        z = np.maximum(z, NEAR)
        return np.stack([self.centre + self.focal * x / z, self.horizon + self.focal * (self.eye - y) / z], -1)

    def upright(self, x, z, points, along=False):
        """(offset, up) points on an upright plane facing us at depth z around x, or along the street at x -> pixels."""
        offset, up = (np.asarray(points, np.float64)[..., axis] for axis in (0, 1))
        return self.project(x, up, z + offset) if along else self.project(x + offset, up, z)

    def ground(self, x0, x1, z0, z1):  # a rectangle (or rectangles) on the road plane -> pixels
        corners = rect(x0, z0, x1, z1)
        return self.project(corners[..., 0], 0.0, corners[..., 1])

    def fill(self, polygons, color, name=None):
        """Paint pixel polygons ((N, K, 2)) in `color` (None: don't) and, given a class name, label them."""
        points = list(np.round(np.multiply(polygons, 1 << SHIFT)).astype(np.int32))
        if points and color is not None:
            cv2.fillPoly(self.image, points, np.clip(color, 0, 255).tolist(), cv2.LINE_8, SHIFT)
        if points and name is not None:
            cv2.fillPoly(self.label, points, ID[name], cv2.LINE_8, SHIFT)

    def stroke(self, points, width, color, name, closed=False):
        """A polyline through pixel points, `width` pixels (at least 1) wide: limbs, tubes, tyres."""
        points, width = [np.round(np.multiply(points, 1 << SHIFT)).astype(np.int32)], max(1, round(width))
        cv2.polylines(self.image, points, closed, np.clip(color, 0, 255).tolist(), width, cv2.LINE_8, SHIFT)
        cv2.polylines(self.label, points, closed, ID[name], width, cv2.LINE_8, SHIFT)


def plan_street(rng):
    """Where things are across the street (x, metres) on each side (-1 left, 1 right), and how far it goes."""
    lane = rng.uniform(2.8, 3.6)
    lanes = np.arange(-int(rng.choice([0, 1, 1, 2])), int(rng.choice([1, 1, 2]))) * lane  # ours is at x = 0
    sides = {}
    for side, edge in ((-1, lanes[0] - lane / 2), (1, lanes[-1] + lane / 2)):
        parking = rng.uniform(2.0, 2.5) if rng.random() < 0.3 else 0.0
        walk = edge + side * (parking + rng.uniform(1.8, 5.0))  # the sidewalk's outer edge
        facade = walk + side * (rng.uniform(1.0, 5.0) if rng.random() < 0.45 else 0.0)  # behind front gardens
        sides[side] = SimpleNamespace(lane_edge=edge, parking=parking, curb=edge + side * parking, walk=walk,
                                      facade=facade, park=rng.random() < 0.2)
    closed = rng.random() < 0.5  # by a building; else the street runs to the horizon
    return SimpleNamespace(lanes=lanes, sides=sides, closed=closed, end=rng.uniform(50, 150) if closed else 400)


def draw_ground(scene, street):
    """Sky, terrain up to the horizon, and on it the road with markings, parking strips in its grey, sidewalks."""
    rng, end, stop = scene.rng, street.end, min(street.end, 150.0)
    top, low = ((65, 115, 185), (170, 192, 218)) if scene.sunny else ((170, 174, 182), (208, 208, 212))  # or overcast
    blend = np.clip(np.arange(scene.height) / scene.horizon, 0, 1)[:, None, None] ** rng.uniform(0.6, 1.4)
    scene.image[:], scene.label[:] = scene.pick(top) * (1 - blend) + scene.pick(low, 8) * blend, ID["sky"]
    clouds = np.clip(scene.noise(scene.width / 10) - rng.uniform(0, 1), 0, 1) * rng.uniform(0.2, 0.6)  # white ones
    scene.image += clouds[..., None] * (235.0 - scene.image)
    scene.fill([rect(-1, scene.horizon, scene.width + 1, scene.height + 1)], scene.pick("terrain"), "terrain")
    road = scene.pick("road", 6)
    scene.fill([scene.ground(street.sides[-1].curb, street.sides[1].curb, NEAR, end)], road, "road")
    for boundary in (street.lanes[:-1] + street.lanes[1:]) / 2:  # dashes between lanes: road, as in Cityscapes
        z = np.arange(1.0, stop, rng.uniform(6.0, 12.0))
        scene.fill(scene.ground(boundary - 0.07, boundary + 0.07, z, z + rng.uniform(2.0, 4.0)), scene.pick(WHITE, 8))
    for side, edge in street.sides.items():  # a solid line along the road's edge, or none
        x = edge.curb - side * (edge.parking + 0.3)
        scene.fill([scene.ground(x - 0.06, x + 0.06, NEAR, stop)] if rng.random() < 0.5 else [], scene.pick(WHITE, 8))
    for side, edge in street.sides.items():
        if edge.parking:  # only its place along the curb tells it from the road
            scene.fill([scene.ground(edge.curb, edge.lane_edge, NEAR, end)], scene.pick(road, 8), "parking")
        color = scene.pick("sidewalk")
        scene.fill([scene.ground(edge.curb, edge.walk, NEAR, end)], color, "sidewalk")
        scene.fill([scene.ground(edge.curb, edge.curb + side * 0.2, NEAR, end)], color * 1.15)  # curb stones
        joints = np.arange(rng.uniform(0, 2), 30, rng.uniform(1.0, 2.5))  # between paving slabs
        scene.fill(scene.ground(edge.curb, edge.walk, joints, joints + 0.06), color * 0.8)


def draw_building(scene, place, length, height, depth):
    """A facade `length` x `height` metres, shaded now and then on sunny days; place() maps (along, up) to pixels."""
    rng, color = scene.rng, scene.pick("building")
    color = color * (rng.uniform(0.55, 0.8) if scene.sunny and rng.random() < 0.5 else 1)
    glass = scene.pick((55, 65, 80) if rng.random() < 0.6 else (150, 165, 185), 10)
    scene.fill([place(rect(0, 0, length, height))], color, "building")
    scene.fill([place(rect(0, height - 0.5, length, height))], color * rng.uniform(0.7, 0.9))  # cornice
    scene.fill([place(rect(0, 0, length, rng.uniform(0.4, 1.0)))] if rng.random() < 0.6 else [], color * 0.7)  # plinth
    shops = np.arange(0.5, length - 4, 5.0) if rng.random() < 0.4 else np.array([])  # shop windows
    scene.fill(place(rect(shops, 0.5, shops + rng.uniform(2, 4), 2.8)), glass * 0.8)
    floor, width, gap = rng.uniform((2.8, 0.8, 0.8), (3.5, 1.5, 2.0))
    if scene.focal / depth * floor >= 3:  # else the windows are too small to see
        y, along = np.meshgrid(np.arange(rng.uniform(2.5, 4.5), height - 1.5, floor),
                               np.arange(rng.uniform(0.3, 1.2), length - width, width + gap))
        scene.fill(place(rect(along.ravel(), y.ravel(), along.ravel() + width, y.ravel() + floor * 0.5)), glass)


def draw_roadside(scene, street, side):
    """Facades with gaps (or a park) showing buildings and trees further back; now and then a wall or fence."""
    rng, edge = scene.rng, street.sides[side]
    z, behind = rng.uniform(-6.0, 2.0), edge.facade + side * rng.uniform(15.0, 40.0)
    while z < street.end:
        z1 = min(z + rng.uniform(6.0, 25.0) * (1 + max(z, 0.0) / 100), street.end)  # far ones: a few pixels anyway
        height = rng.uniform(6.0, 28.0)
        if edge.park or rng.random() < 0.12:  # a gap: the far things first, the nearer ones hide them
            draw_building(scene, partial(scene.upright, behind, z, along=True), z1 - z, height * 1.5, z1)
            for tree_z in sorted(rng.uniform(z, z1, rng.integers(1, 4) if z < FAR else 0), reverse=True):
                draw_tree(scene, edge.facade + side * rng.uniform(1.0, 12.0), tree_z)
        else:
            draw_building(scene, partial(scene.upright, edge.facade, z, along=True), z1 - z, height, z1)
        if rng.random() < (0.5 if edge.park else 0.15):
            draw_barrier(scene, partial(scene.upright, edge.facade, max(z, NEAR), along=True), z1 - max(z, NEAR))
        z = z1


def draw_barrier(scene, place, length):
    """A wall, in the greys of facades and roads, or a fence; place() maps its (along, up) to pixels."""
    rng, height = scene.rng, scene.rng.uniform(0.8, 2.5)
    if rng.random() < 0.5:
        color = scene.pick("wall", 10)
        scene.fill([place(rect(0, 0, length, height))], color, "wall")
        scene.fill([place(rect(0, height - 0.15, length, height))], color * 1.2)  # coping stones
    else:  # labelled as a whole, painted as bars and rails: what is behind shows through
        scene.fill([place(rect(0, 0, length, height))], None, "fence")
        bars, color = np.arange(0, length, rng.uniform(0.12, 0.3)), scene.pick("pole", 10)
        scene.fill(place(rect(bars, 0, bars + 0.04, height)), color)
        scene.fill(place(rect(0, [0.1, height - 0.1], length, [0.16, height - 0.04])), color)


def draw_tree(scene, x, z):
    """A trunk and a crown of overlapping discs in three shades of one green; all of it vegetation."""
    rng, (crown, bole, trunk) = scene.rng, scene.rng.uniform((1.5, 1.8, 0.1), (3.5, 3.5, 0.22))  # bole: trunk height
    scene.fill([scene.upright(x, z, rect(-trunk, 0, trunk, bole + crown / 2))], scene.pick((95, 80, 65)), "vegetation")
    count, green = rng.integers(8, 16), scene.pick("vegetation")
    centres = (0, bole + crown * 0.9) + rng.normal(0, 1, (count, 2)) * (crown * 0.5, crown * 0.4)
    discs = scene.upright(x, z, centres[:, None] + polygon(12, crown * rng.uniform(0.35, 0.65, (count, 1, 1))))
    for clump in np.array_split(discs, 3):
        scene.fill(clump, scene.pick(green), "vegetation")


def draw_vehicle(scene, x, z, kind):
    """A box seen from behind, and from the side when off-centre, with windows, lamps and wheels."""
    rng, car = scene.rng, kind == "car"
    width, height, length = (rng.uniform(*bounds) for bounds in VEHICLES[kind])
    color, glass = scene.pick("vehicle", 8), scene.pick((45, 50, 60) if rng.random() < 0.7 else (140, 155, 175), 8)
    scene.fill([scene.ground(x - width / 2 - 0.1, x + width / 2 + 0.1, z - 0.3, z + length)], (30, 30, 33))  # shadow
    if abs(x) > width / 2 + 0.1:  # we see the side that faces the middle of the street
        place, scale = partial(scene.upright, x - np.sign(x) * width / 2, z, along=True), (length, height)
        scene.fill([place(np.multiply(CAR_SIDE if car else rect(0, 0.1, 1, 1), scale))], color * 0.85, kind)
        band = np.arange(0.03, 0.95, 0.095)  # a bus's row of windows, a truck's cab window, a car's
        windows = {"truck": [rect(0.8, 0.5, 0.97, 0.74)], "car": [rect(0.25, 0.68, 0.62, 0.95)]}
        scene.fill(place(np.multiply(windows.get(kind, rect(band, 0.55, band + 0.085, 0.88)), scale)), glass)
        for along in (0.17, 0.83) if car else (0.12, 0.88):
            scene.fill([place(polygon(12, height / 5) + (along * length, height / 5))], (30, 30, 32), kind)
    place, scale = partial(scene.upright, x, z), (width, height)
    scene.fill([place(rect(sign * 0.32, 0, sign * 0.47, 0.22) * scale) for sign in (-1, 1)], (30, 30, 32), kind)
    scene.fill([place(np.multiply(CAR_BACK if car else rect(-0.5, 0.12, 0.5, 1.0), scale))], color, kind)
    if kind != "truck":  # a truck shows the doors of its cargo box
        scene.fill([place(rect(-0.36, 0.68, 0.36, 0.92) * scale)], glass)
    lamps = [place(rect(sign * 0.36, 0.42, sign * 0.48, 0.52) * scale) for sign in (-1, 1)]
    scene.fill(lamps, (230, 40, 35) if rng.random() < 0.3 else (150, 30, 30))  # braking or not
    scene.fill([place(rect(-0.12, 0.28, 0.12, 0.36) * scale)], scene.pick((220, 220, 215), 5))  # number plate


def draw_person(scene, x, z, name="person", seat=0.0):
    """Thick strokes and a round head, from the front or back: a pedestrian mid-stride, or a rider sitting `seat`
    metres up on a two-wheeler; the same shape, so only the context tells the two classes apart."""
    rng, scale = scene.rng, scene.focal / z
    tall = rng.uniform(1.3, 1.45) if seat else rng.uniform(1.55, 1.95) if rng.random() > 0.1 else rng.uniform(1, 1.35)
    stride, swing, legs, body = *rng.uniform(-0.1, 0.1, 2), scene.pick("clothes", 10), scene.pick("clothes", 10)
    limbs = [([(0, 0.5), (0, 0.78)], 0.34, body)] + [  # (across, up in heights) points, width in metres, color
        limb for sign in (-1, 1) for limb in (([(sign * (0.1 + stride), 0.03), (sign * 0.08, 0.5)], 0.13, legs),
                                              ([(sign * 0.19, 0.8), (sign * 0.24 + swing, 0.47)], 0.08, body))]
    for points, width, color in limbs:
        scene.stroke(scene.upright(x, z, np.multiply(points, (1, tall)) + (0, seat)), width * scale, color, name)
    scene.fill([scene.upright(x, z, polygon(12, 0.11) + (0, seat + tall - 0.11))], scene.pick("skin", 8), name)


def draw_two_wheeler(scene, x, z, kind):
    """A bicycle, or a motorcycle (heavier tubes and tyres), crossing the view, and its rider."""
    place, color = partial(scene.upright, x, z), scene.pick("vehicle", 10)
    tube, tyre = np.multiply((0.14, 0.1) if kind == "motorcycle" else (0.04, 0.05), scene.focal / z)  # in pixels
    for points in FRAME:
        scene.stroke(place(points), tube, color, kind)
    for hub in (-0.52, 0.52):
        scene.stroke(place(polygon(16, 0.32) + (hub, 0.34)), tyre, (30, 30, 30), kind, closed=True)
    draw_person(scene, x, z, "rider", seat=0.35)


def draw_pole(scene, x, z, side):
    """A pole at the curb, maybe carrying a sign (a colored rim around its face) or a traffic light beside it."""
    rng, (height, radius) = scene.rng, scene.rng.uniform((3.0, 0.05), (9.0, 0.12))
    scene.fill([scene.upright(x, z, rect(-radius, 0, radius, height))], scene.pick("pole", 10), "pole")
    roll, y, place = rng.random(), rng.uniform(2.2, max(2.3, height - 0.9)), partial(scene.upright, x, z - 0.05)
    if roll < 0.4:
        (corners, rim, face), size = SIGNS[rng.integers(len(SIGNS))], rng.uniform(0.3, 0.45)
        for scale, color, name in ((1.0, rim, "traffic sign"), (0.7, face, None)):  # a round, triangle or diamond
            scene.fill([place(polygon(corners, size * scale, np.pi / 2) + (0, y))], scene.pick(color), name)
    elif roll < 0.75:  # a housing of three lamps, one of them lit
        place, lit = partial(scene.upright, x - side * (radius + 0.15), z - 0.05), rng.integers(3)
        scene.fill([place(rect(-0.15, 0, 0.15, 0.85) + (0, y))], scene.pick((40, 40, 42), 8), "traffic light")
        lamp = [(240, 45, 35), (250, 185, 40), (60, 230, 130)][lit]
        scene.fill([place(polygon(10, 0.085) + (0, y + 0.68 - lit * 0.26))], lamp)


def plan_objects(scene, street):
    """(depth, draw) of everything standing in the street: drawn far to near, nearer things hide farther ones."""
    rng, items, taken, z_max = scene.rng, [], [], min(FAR, street.end - 2.0)

    def row(first, step, chance=1.0):  # the depths of a row of things, or of none
        return np.arange(rng.uniform(*first), z_max, rng.uniform(*step)) if rng.random() < chance else []

    def vehicle(x, z, kind):  # unless it overlaps one placed before
        length = VEHICLES[kind][2][1]
        if z < z_max and all(abs(x - x2) > 1.5 or z + length + 1 < z2 or z - 1 > end2 for x2, z2, end2 in taken):
            taken.append((x, z, z + length))
            items.append((z, partial(draw_vehicle, scene, x, z, kind)))

    for lane in street.lanes:  # traffic ahead; our own car drives in the lane at x = 0
        for _ in range(rng.integers(0, 3)):
            z = np.exp(rng.uniform(np.log(10.0 if lane == 0 else 6.0), np.log(z_max)))
            vehicle(lane + rng.normal(0, 0.2), z, rng.choice(["car", "truck", "bus"], p=[0.86, 0.07, 0.07]))
    for side, edge in street.sides.items():
        for z in row((0, 20), (5, 9), 0.6):  # cars parked along the curb, with gaps
            if rng.random() < 0.7:
                vehicle(edge.curb - side * max(edge.parking, 2.2) / 2, z, "car" if rng.random() < 0.96 else "truck")
        items += [(z, partial(draw_pole, scene, edge.curb + side * 0.4, z, side)) for z in row((3, 15), (12, 35))]
        trees = row((3, 12), (7, 16), 0.5)  # along the sidewalk's outer edge
        items += [(z, partial(draw_tree, scene, edge.walk - side * rng.uniform(0.6, 1.0), z)) for z in trees]
        for z in rng.uniform(6.0, 40.0, rng.poisson(1.5)):  # bollards, bins, columns (static), containers (dynamic)
            name, half, height = PROPS[rng.integers(len(PROPS))]
            outline = scene.upright(edge.curb + side * rng.uniform(0.3, 1.2), z, rect(-half, 0, half, height))
            items.append((z, partial(scene.fill, [outline], scene.pick("prop"), name)))
    for _ in range(rng.poisson(5.0)):  # pedestrians on the sidewalks
        edge, z = street.sides[rng.choice([-1, 1])], np.exp(rng.uniform(np.log(4.0), np.log(60.0)))
        items.append((z, partial(draw_person, scene, rng.uniform(*sorted([edge.curb, edge.walk])), z)))
    for kind, chance in (("bicycle", 0.4), ("motorcycle", 0.3)):
        if rng.random() < chance:  # crossing the street, ridden
            x, z = rng.uniform(street.sides[-1].curb + 1, street.sides[1].curb - 1), rng.uniform(8.0, 40.0)
            items.append((z, partial(draw_two_wheeler, scene, x, z, kind)))
    return items


def draw_ignored(scene):
    """What Cityscapes ignores: the hood of our car, rectification wedges at the sides, out-of-roi frame, specks."""
    rng, width, height, band = scene.rng, scene.width, scene.height, max(1, round(scene.height / 256))
    if rng.random() < 0.5:  # our car's hood: the top of an ellipse below the image, 6 to 14% of its height
        hood = polygon(48, 1) * (width * 0.9, height * rng.uniform(0.36, 0.44)) + (width / 2, height * 1.3)
        scene.fill([hood], scene.pick("vehicle", 8), "ego vehicle")
    for edge in (0, width) if rng.random() < 0.5 else ():  # undistortion leaves no data, most at the corners
        inset = abs(edge - rng.uniform(0.01, 0.03) * width)
        wedge = [(edge, 0), (inset, 0), (edge, height / 2), (inset, height), (edge, height)]
        scene.fill([wedge], (15, 15, 18), "rectification border")
    for centre in rng.uniform((0, 0), (width, height), (rng.integers(1, 5), 2)):  # label only
        scene.fill([centre + polygon(6, rng.uniform(1, 4) * width / 512)], None, "unlabeled")
    scene.label[:band], scene.label[-band:], scene.label[:, :band], scene.label[:, -band:] = (ID["out of roi"],) * 4


def camera_response(scene):
    """Texture per class, exposure, white balance, gamma, blur and sensor noise -> uint8 RGB."""
    rng, amounts = scene.rng, np.zeros((3, 256), np.float32)
    amounts[:, [ID[name] for name in TEXTURE]] = np.transpose(list(TEXTURE.values()))
    gain = 1 + amounts[0][scene.label] * rng.standard_normal(scene.label.shape, dtype=np.float32)
    for amount, cell in zip(amounts[1:], (6.0, 30.0), strict=True):  # texture follows the labels
        gain += amount[scene.label] * scene.noise(cell * scene.width / 512)
    image = scene.image * gain[..., None] * rng.uniform(0.65, 1.25) * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    image = 255 * cv2.pow(np.clip(image, 0, 255) / 255, rng.uniform(0.8, 1.2))
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9) * scene.width / 512)
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2.0, 7.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def draw_scene(rng, size):
    """One street scene: (RGB uint8 image (H, W, 3), Cityscapes label ids uint8 (H, W))."""
    scene, street = Scene(rng, size), plan_street(rng)
    draw_ground(scene, street)
    if street.closed:  # by a building facing us across the street
        left, right = street.sides[-1].facade - 20, street.sides[1].facade + 20
        draw_building(scene, partial(scene.upright, left, street.end), right - left, rng.uniform(8, 30), street.end)
    for side in (-1, 1):
        draw_roadside(scene, street, side)
    for _, draw in sorted(plan_objects(scene, street), key=lambda item: -item[0]):
        draw()
    draw_ignored(scene)
    return camera_response(scene), scene.label


def marker_text(n_train, n_val, size, seed):
    return ("Synthetic street scenes in the Cityscapes layout, written by synthetic.py: not real Cityscapes data.\n"
            f"version: {GENERATOR_VERSION}\nseed: {seed}\ntrain: {n_train}\nval: {n_val}\nsize: {size[0]}x{size[1]}\n")


def generate(root, n_train=48, n_val=16, size=(256, 512), seed=0, progress=True) -> None:
    """Write n_train + n_val scenes of `size` (H, W) under `root` as Cityscapes' leftImg8bit and gtFine labelIds.
    SYNTHETIC.partial marks the folder as ours while writing; SYNTHETIC, written last, records the settings."""
    root, size = Path(root), tuple(map(int, size))
    if seed < 0 or min(n_train, n_val) < 0 or len(size) != 2 or min(size) < 16:
        raise ValueError(f"need seed, train, val >= 0 and a size H, W >= 16; got {seed}, {n_train}, {n_val}, {size}")
    # Refuse a non-empty folder this generator did not make: it may hold the real data (.tmp: an interrupted write).
    names = {path.name for path in root.iterdir()} if root.is_dir() else set()
    if names and not {name.split(".tmp")[0] for name in names} & {MARKER, PARTIAL_MARKER}:
        raise FileExistsError(f"{root} is not empty and has no {MARKER} file: it may hold real data; not writing there")
    root.mkdir(parents=True, exist_ok=True)
    write_atomically(str(root / PARTIAL_MARKER), lambda f: f.write(b"synthetic.py is writing this folder\n"))
    for stale in set(root.glob(f"{MARKER}*")) - {root / PARTIAL_MARKER}:  # the old marker, temporary files
        stale.unlink()
    for split, cities in SPLIT_CITIES.items():
        for folder in (root / kind / split / city for kind in ("leftImg8bit", "gtFine") for city in cities):
            shutil.rmtree(folder, ignore_errors=True)  # what earlier runs left, temporary files too, must go
            folder.mkdir(parents=True)  # fails if the old one could not be removed
    jobs = [(split, index) for split, count in (("train", n_train), ("val", n_val)) for index in range(count)]
    for split, index in tqdm(jobs, desc=f"synthetic data -> {root}", disable=not progress):
        city = SPLIT_CITIES[split][index % 2]
        stem = f"{city}/{city}_{index // 2:06d}_000019"  # the cities in turn; gtFine frames are all 19th
        # One generator per image: an image depends only on (seed, split, index), not on the counts.
        image, label = draw_scene(np.random.default_rng([seed, list(SPLIT_CITIES).index(split), index]), size)
        for path, array in ((f"leftImg8bit/{split}/{stem}_leftImg8bit.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)),
                            (f"gtFine/{split}/{stem}_gtFine_labelIds.png", label)):
            png = cv2.imencode(".png", array)[1].tobytes()  # cv2 raises on an array it cannot encode
            write_atomically(str(root / path), lambda f, png=png: f.write(png))
    write_atomically(str(root / MARKER), lambda f: f.write(marker_text(n_train, n_val, size, seed).encode()))
    (root / PARTIAL_MARKER).unlink()


def ensure_synthetic(root, n_train, n_val, size, seed=0, progress=True) -> bool:
    """Generate the data set unless `root` holds a complete one made with these settings; True if it generated."""
    marker, size = Path(root) / MARKER, tuple(map(int, size))
    if marker.is_file() and marker.read_text() == marker_text(n_train, n_val, size, seed):
        return False
    print(f"generating synthetic data ({n_train} + {n_val} images of {size[0]}x{size[1]}) in {root}", flush=True)
    generate(root, n_train, n_val, size, seed, progress=progress)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic street scenes in the Cityscapes layout.")
    parser.add_argument("--root", default="data/synthetic", help="output folder (must be new, empty or synthetic)")
    parser.add_argument("--train", type=int, default=48, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"), help="image size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if not ensure_synthetic(args.root, args.train, args.val, args.size, args.seed, progress=not args.quiet):
            print(f"{args.root} holds this synthetic data set already: nothing to write")
            return
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:  # a read-only folder, a full disk: write_atomically names the file
        raise SystemExit(f"error: cannot write the synthetic data in {args.root}: {error.strerror or error}") from None
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"wrote {args.train} train + {args.val} val images to {args.root}")


if __name__ == "__main__":
    main()

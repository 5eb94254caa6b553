"""The synthetic moving-shapes dataset of the RC2020 study, rendered into the common frames layout.

Normal motion is white circles moving at a constant speed in straight lines, bouncing off the walls. Test videos add
anomaly events: a square at normal speed (spatial), a circle at the anomaly speed (temporal), or a square at the
anomaly speed (spatio_temporal). By default an event transforms one existing object for its frames and then restores
it, and squares have the circle's area, so neither the number of objects nor the number of white pixels betrays an
anomaly.

Shapes are drawn anti-aliased from exact sub-pixel positions (analytic pixel coverage), so measured centroids move
by the nominal speed. Frames are drawn at `render_size`, resized once to the profile's frame size with INTER_AREA,
then sensor noise is added at that size (so `noise_std` is in output grey levels).

Layout: out_dir/{train,test}/<video>/<000000>.png and out_dir/labels.csv (split,video,frame,label,anomaly_type),
one row per frame of both splits.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import ANOMALY_TYPES, ConfigError, Dataset, SyntheticSource

# The first frames of a video are never scored (prediction needs 4 input frames), so an event never starts there.
MIN_LEAD_IN_FRAMES = 4

SQUARE_TYPES = ("spatial", "spatio_temporal")
FAST_TYPES = ("temporal", "spatio_temporal")


@dataclass
class MovingObject:
    x: float            # centre, in pixels at render size (pixel i spans [i, i+1))
    y: float
    dx: float           # unit direction of motion
    dy: float
    speed: float        # px/frame
    shape: str          # circle | square

    def step(self, low: float, high: float) -> None:
        """Move one frame, reflecting off the walls so the whole shape stays inside [low, high]."""
        self.x, self.dx = _reflect(self.x + self.dx * self.speed, self.dx, low, high)
        self.y, self.dy = _reflect(self.y + self.dy * self.speed, self.dy, low, high)


@dataclass(frozen=True)
class Event:
    kind: str           # anomaly type
    start: int          # first abnormal frame
    stop: int           # first normal frame after the event


def _reflect(position: float, direction: float, low: float, high: float) -> tuple[float, float]:
    # A loop, not one reflection: a speed larger than the free range can bounce more than once per frame.
    while not low <= position <= high:
        position = 2 * low - position if position < low else 2 * high - position
        direction = -direction
    return position, direction


def _draw_int(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _half_extent(gen: SyntheticSource) -> float:
    """Wall margin for every object: the larger half-size of circle and square, so a shape change never leaves the
    frame and a transformed object keeps the trajectory it would have had."""
    return max(gen.circle_radius, gen.square_size / 2)


def _random_object(rng: np.random.Generator, gen: SyntheticSource, shape: str, speed: float) -> MovingObject:
    low, high = _half_extent(gen), gen.render_size - _half_extent(gen)
    angle = rng.uniform(0.0, 2 * math.pi)
    return MovingObject(rng.uniform(low, high), rng.uniform(low, high), math.cos(angle), math.sin(angle), speed, shape)


def _anomalous_look(gen: SyntheticSource, kind: str) -> tuple[str, float]:
    shape = "square" if kind in SQUARE_TYPES else "circle"
    speed = gen.anomaly_speed if kind in FAST_TYPES else gen.normal_speed
    return shape, speed


def schedule_events(gen: SyntheticSource, rng: np.random.Generator) -> tuple[list[Event], list[str]]:
    """One event of each anomaly type in a shuffled order, after a normal lead-in and separated by normal gaps.

    Returns the events that fit in the video and the types that did not.
    """
    order = [gen.anomaly_types[i] for i in rng.permutation(len(gen.anomaly_types))]
    frame = max(_draw_int(rng, gen.event_gap), MIN_LEAD_IN_FRAMES)
    events, not_fitted = [], []
    for kind in order:
        length = _draw_int(rng, gen.event_length)
        if frame + length > gen.frames_per_video:
            not_fitted.append(kind)
            continue
        events.append(Event(kind, frame, frame + length))
        frame += length + _draw_int(rng, gen.event_gap)
    return events, not_fitted


def simulate_video(gen: SyntheticSource, rng: np.random.Generator,
                   events: list[Event]) -> tuple[list[list[tuple[str, float, float]]], list[str]]:
    """Shapes (shape, x, y) visible in every frame, and every frame's anomaly type ('' when normal).

    An event's first frame already shows the anomalous motion (the step into it uses the event's speed), and the
    frame after it the normal motion again. Objects never leave the frame, so an event's object is visible in every
    frame of the event: those frames, and only those, are abnormal.
    """
    low, high = _half_extent(gen), gen.render_size - _half_extent(gen)
    objects = [_random_object(rng, gen, "circle", gen.normal_speed) for _ in range(_draw_int(rng, gen.objects))]
    starting = {event.start: event for event in events}
    ending = {event.stop: event for event in events}
    event_object: MovingObject | None = None
    frames, labels = [], [""] * gen.frames_per_video
    for event in events:
        labels[event.start:event.stop] = [event.kind] * (event.stop - event.start)

    for t in range(gen.frames_per_video):
        if t in ending:
            if gen.transform_existing:
                event_object.shape, event_object.speed = "circle", gen.normal_speed
            else:
                objects.remove(event_object)
            event_object = None
        if t in starting and gen.transform_existing:
            event_object = objects[int(rng.integers(len(objects)))]
            event_object.shape, event_object.speed = _anomalous_look(gen, starting[t].kind)
        if t > 0:
            for obj in objects:
                obj.step(low, high)
        if t in starting and not gen.transform_existing:
            # Added after the step: the new object appears at its starting position in the event's first frame.
            event_object = _random_object(rng, gen, *_anomalous_look(gen, starting[t].kind))
            objects.append(event_object)
        frames.append([(obj.shape, obj.x, obj.y) for obj in objects])
    return frames, labels


def render_coverage(shapes: list[tuple[str, float, float]], gen: SyntheticSource) -> np.ndarray:
    """Fraction of each pixel covered by the union of the shapes (float32, 0..1), at render size."""
    size = gen.render_size
    pixel_centres = np.arange(size, dtype=np.float64) + 0.5
    coverage = np.zeros((size, size), np.float64)
    for shape, x, y in shapes:
        if shape == "circle":
            # Coverage ramps over one pixel across the rim: area pi * (r^2 + 1/12) and an exact centroid.
            distance = np.hypot(pixel_centres[None, :] - x, pixel_centres[:, None] - y)
            covered = np.clip(gen.circle_radius + 0.5 - distance, 0.0, 1.0)
        else:
            # An axis-aligned square's coverage is exact: the product of its overlaps with each pixel column and row.
            half = gen.square_size / 2
            overlap_x = np.clip(np.minimum(pixel_centres + 0.5, x + half) - np.maximum(pixel_centres - 0.5, x - half),
                                0.0, 1.0)
            overlap_y = np.clip(np.minimum(pixel_centres + 0.5, y + half) - np.maximum(pixel_centres - 0.5, y - half),
                                0.0, 1.0)
            covered = overlap_y[:, None] * overlap_x[None, :]
        np.maximum(coverage, covered, out=coverage)
    return coverage.astype(np.float32)


def draw_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a smooth gradient plus blurred noise blobs, at mid-grey so white objects stand out."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0.0, 2 * math.pi)
    gradient = (cols * math.cos(angle) + rows * math.sin(angle)) * rng.uniform(30.0, 70.0)
    blobs = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigmaX=size / 10)
    blobs *= rng.uniform(10.0, 20.0) / max(float(blobs.std()), 1e-6)
    return np.clip(rng.uniform(80.0, 130.0) + gradient + blobs, 30.0, 190.0).astype(np.float32)


def _to_output(grey: np.ndarray, dataset: Dataset, rng: np.random.Generator) -> np.ndarray:
    """Resize once to the profile's frame size, add sensor noise, quantise, and give the profile's channels."""
    size = dataset.profile.frame_size
    if grey.shape[0] != size:
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    if dataset.source.noise_std > 0:
        grey = grey + rng.normal(0.0, dataset.source.noise_std, grey.shape).astype(np.float32)
    image = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if dataset.profile.channels == 3 else image


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write the frame (disk full or not writable?)")


def _check_fits(dataset: Dataset) -> None:
    gen = dataset.source
    if gen.render_size <= 2 * _half_extent(gen):
        raise ConfigError(
            f"params.yaml: datasets.{dataset.name}.source: shapes {2 * _half_extent(gen):.1f} px wide do not fit "
            f"in render_size {gen.render_size}; lower circle_radius/square_side or raise render_size")


def render_dataset(dataset: Dataset, root: Path) -> dict:
    """Render `dataset` (a synthetic one) into the empty folder `root`; return counts of videos, frames and
    anomalies. Deterministic per source.seed: the same seed gives byte-identical PNGs and labels. The summary's
    `events_not_fitted` counts, per type, the events that did not fit in frames_per_video."""
    if not isinstance(dataset.source, SyntheticSource):
        raise ValueError(f"dataset {dataset.name!r} is not synthetic: it has no generator to render")
    _check_fits(dataset)
    gen = dataset.source
    scene_seeds, train_seeds, test_seeds = np.random.SeedSequence(gen.seed).spawn(3)
    if gen.scenes > 1:
        backgrounds = [draw_scene(np.random.default_rng(s), gen.render_size) for s in scene_seeds.spawn(gen.scenes)]
    else:
        backgrounds = [np.zeros((gen.render_size, gen.render_size), np.float32)]

    name_width = max(2, len(str(max(gen.train_videos, gen.test_videos) - 1)))
    rows = []
    summary = {
        "train_videos": gen.train_videos, "test_videos": gen.test_videos,
        "train_frames": gen.train_videos * gen.frames_per_video, "test_frames": gen.test_videos * gen.frames_per_video,
        "abnormal_frames": dict.fromkeys(ANOMALY_TYPES, 0),
        "events": dict.fromkeys(ANOMALY_TYPES, 0),
        "events_not_fitted": dict.fromkeys(ANOMALY_TYPES, 0),
    }
    for split, count, seeds in (("train", gen.train_videos, train_seeds), ("test", gen.test_videos, test_seeds)):
        for index, seed in enumerate(seeds.spawn(count)):
            rng = np.random.default_rng(seed)
            events = []
            if split == "test":
                events, not_fitted = schedule_events(gen, rng)
                for event in events:
                    summary["events"][event.kind] += 1
                for kind in not_fitted:
                    summary["events_not_fitted"][kind] += 1
            shapes_per_frame, labels = simulate_video(gen, rng, events)
            # Scenes cycle through the videos of both splits, so every test scene was seen in training.
            background = backgrounds[index % len(backgrounds)]
            video = f"{index:0{name_width}d}"
            video_dir = root / split / video
            video_dir.mkdir(parents=True)
            for frame, (shapes, kind) in enumerate(zip(shapes_per_frame, labels)):
                coverage = render_coverage(shapes, gen)
                grey = background * (1.0 - coverage) + 255.0 * coverage
                _write_png(video_dir / f"{frame:06d}.png", _to_output(grey, dataset, rng))
                rows.append((split, video, frame, int(bool(kind)), kind))
                if kind:
                    summary["abnormal_frames"][kind] += 1

    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("split", "video", "frame", "label", "anomaly_type"))
        writer.writerows(rows)
    return summary

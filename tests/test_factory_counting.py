"""Tracking (ByteTrack via `track.items`) and counting at the station (`count.items`) on generated conveyor lines
whose true count is known exactly (stages.factory.truth), fed with detections derived from the truth boxes so the
test measures the tracking and counting logic, not the model."""
from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from conveyor.classes import ITEM_NAMES
from conveyor.line import ConveyorLine, LineConfig
from core.errors import UsageError
from pipeline.stage import FrameMeta, FrameResult, StageContext, StageStats, create_stage
from stages.factory.counting import LineCounter, station_band
from stages.factory.tracking import ItemTracker
from stages.factory.truth import IdentifiedLine, detections_from_truth, true_crossings

CLEAN = dict(size=128, seed=3, belt_speed=1.0)  # 128 px frames, items 25-55 px moving 8.5 px per frame
DENSE = dict(size=128, seed=5, belt_speed=1.0, density=2.0, overlap_prob=0.5)
FRAMES = 800


@lru_cache(maxsize=4)
def line(key: tuple) -> list:
    return list(IdentifiedLine(LineConfig(**dict(key))).frames(FRAMES))


def score_run(cfg: dict, noise: dict, seed: int = 0, **tracker) -> dict:
    """Track and count a line; compare each count with the truth item behind it."""
    frames = line(tuple(sorted(cfg.items())))
    w = cfg["size"]
    truth = true_crossings(frames, w / 2)
    rng = np.random.default_rng(seed)
    tr, lc = ItemTracker(**tracker), LineCounter()
    behind: dict[int, Counter] = {}  # tracker item -> truth ids of its detections
    counted = []
    for tf in frames:
        d = detections_from_truth(tf, rng, with_ids=True, **noise)
        up = tr.update(tf.frame.index, d["boxes"], d["scores"], d["classes"], w, w)
        for item, tid in zip(up.track_ids.tolist(), d["truth_ids"].tolist()):
            if item >= 0:
                behind.setdefault(item, Counter())[tid] += 1
        counted += lc.update(tf.frame.index, tf.frame.index / 15, w, w, [i.as_dict(ITEM_NAMES) for i in up.active],
                             [i.as_dict(ITEM_NAMES) for i in up.ended],
                             list(tr.velocity) if tr.calibrated else None)
    who = Counter(behind[c.id].most_common(1)[0][0] for c in counted)
    true_by_class = {ITEM_NAMES[k]: v for k, v in truth.by_class.items()}
    return {"truth": truth.total, "counted": lc.total, "error": lc.total - truth.total,
            "missed": sum(1 for i in truth.crossing_frame if who[i] == 0),
            "double": sum(v - 1 for i, v in who.items() if v > 1 and i),
            "spurious": sum(v for i, v in who.items() if i == 0 or i not in truth.crossing_frame),
            "class_error": sum(abs(true_by_class.get(k, 0) - lc.by_class.get(k, 0))
                               for k in set(true_by_class) | set(lc.by_class)),
            "items_per_min": lc.rate_per_min(frames[-1].frame.index / 15)[1]}


def test_identified_line_renders_the_same_line_and_tags_every_box():
    cfg = dict(size=128, seed=9, belt_speed=1.0)
    plain = list(ConveyorLine(LineConfig(**cfg)).frames(40))
    tagged = list(IdentifiedLine(LineConfig(**cfg)).frames(40))
    for p, t in zip(plain, tagged):
        f = t.frame
        assert np.array_equal(p.image, f.image) and np.array_equal(p.boxes, f.boxes)
        assert np.array_equal(p.classes, f.classes) and np.array_equal(p.semantic, f.semantic) and p.label == f.label
        assert len(t.ids) == len(f.boxes) and (t.ids >= 1).all() and len(set(t.ids.tolist())) == len(t.ids)
    # an item keeps its id while it moves right at belt speed
    a, b = tagged[10], tagged[11]
    common = set(a.ids.tolist()) & set(b.ids.tolist())
    assert common
    for i in common:
        xa = a.frame.boxes[a.ids.tolist().index(i)]
        xb = b.frame.boxes[b.ids.tolist().index(i)]
        assert xb[2] >= xa[2]


def test_clean_line_counts_every_item_exactly_once():
    r = score_run(CLEAN, {})
    print("clean line:", r)
    assert r["truth"] >= 100
    assert r["error"] == 0 and r["missed"] == 0 and r["double"] == 0 and r["spurious"] == 0
    assert r["class_error"] == 0
    assert 100 < r["items_per_min"] < 1000


def test_clean_line_with_detector_noise_counts_exactly():
    r = score_run(CLEAN, dict(jitter=0.03, drop=0.1, flip=0.1, false_pos=0.1))
    print("clean line, 10 % dropouts / flips / false positives, 3 % jitter:", r)
    assert r["error"] == 0 and r["double"] == 0 and r["spurious"] == 0


def test_dense_line_with_dropouts():
    """Three dense scenes (one belt family pinned: the belt only changes how the seed's draws fall): each count
    within 2 of the truth, nothing counted that is not there, and under 1 % of items missed or counted twice
    (measured: 3 of 475 on these scenes; in one scene of one earlier draw, 1 of 164)."""
    truth = wrong = 0
    for seed in (5, 6, 7):
        r = score_run(dict(DENSE, seed=seed, belts="rubber"), dict(jitter=0.03, drop=0.2, flip=0.1, false_pos=0.1))
        print(f"dense line {seed} (density 2, overlap 0.5), 20 % dropouts, 10 % flips and false positives:", r)
        assert r["truth"] >= 100
        assert abs(r["error"]) <= 2 and r["spurious"] == 0
        truth, wrong = truth + r["truth"], wrong + r["missed"] + r["double"]
    assert wrong <= 0.01 * truth


def test_belt_motion_compensation_is_what_keeps_small_fast_items():
    off = score_run(CLEAN, dict(jitter=0.03, drop=0.1, flip=0.1, false_pos=0.1), belt_motion="off")
    print("same, plain ByteTrack in image coordinates:", off)
    assert off["missed"] > 0  # the reason for belt coordinates: see stages.factory.tracking


def _active(i, box, hits, first=0, cls=0, score=0.9):
    return {"id": i, "box": box, "hits": hits, "first_frame": first, "class": cls, "name": ITEM_NAMES[cls],
            "score": score, "class_share": 1.0}


def test_counter_rules_flicker_jitter_and_fragments():
    w = h = 200
    assert station_band(w, h) == (75.0, 125.0)
    # a flicker: crosses the line but is seen on two frames only, then ends -> never counted
    c = LineCounter(min_hits=3)
    c.update(0, 0.0, w, h, [_active(1, [80, 50, 96, 70], 1)], [])
    assert c.update(1, 0.1, w, h, [_active(1, [96, 50, 112, 70], 2)], []) == []
    c.update(2, 0.2, w, h, [], [_active(1, [96, 50, 112, 70], 2)])
    assert c.total == 0
    # jitter back and forth across the line: counted once, when the hits suffice
    c = LineCounter(min_hits=3)
    xs = [60, 70, 92, 105, 95, 106, 96, 110]
    got = [c.update(k, k / 15, w, h, [_active(7, [x, 50, x + 10, 70], k + 1)], []) for k, x in enumerate(xs)]
    assert sum(len(g) for g in got) == 1 and got[3][0].crossing_frame == 3 and c.by_class == {"tshirt": 1}
    # a fragment: a counted item is lost inside the band, and a new id is born just past the line where the item
    # should be; without the refractory rule the late-confirmation rule below would count it a second time
    c = LineCounter(min_hits=3)
    for k in range(4):  # centres 80, 88, 96, 104: crosses x = 100 on frame 3
        c.update(k, k / 15, w, h, [_active(3, [70 + 8 * k, 50, 90 + 8 * k, 70], k + 1)], [], [8.0, 0.0])
    assert c.total == 1
    c.update(4, 4 / 15, w, h, [], [], [8.0, 0.0])  # item 3 lost
    for k in range(5, 9):  # a new id next to item 3's predicted place (centre 119 on frame 5), moving on
        c.update(k, k / 15, w, h, [_active(4, [69 + 8 * k, 51, 89 + 8 * k, 71], k - 4, first=5)], [], [8.0, 0.0])
    assert c.total == 1 and c.suppressed == 1
    # the same new id with no counted item nearby before it is a late confirmation and counts
    c = LineCounter(min_hits=3)
    for k in range(5, 9):
        c.update(k, k / 15, w, h, [_active(4, [69 + 8 * k, 51, 89 + 8 * k, 71], k - 4, first=5)], [], [8.0, 0.0])
    assert c.total == 1 and c.suppressed == 0
    # a late confirmation just past the line (missed detections before it) still counts
    c = LineCounter(min_hits=3)
    c.update(0, 0.0, w, h, [_active(9, [92, 50, 112, 70], 3)], [], [8.0, 0.0])
    assert c.total == 1
    # ... but not one far past the line
    c = LineCounter(min_hits=3)
    c.update(0, 0.0, w, h, [_active(9, [130, 50, 150, 70], 3)], [], [8.0, 0.0])
    assert c.total == 0


def _frame(index: int, det: dict, size=(128, 128)) -> FrameResult:
    return FrameResult(FrameMeta(0, index, 1_000_000_000 + index * 66_666_667), 0, 900, (24, 32, 32), size,
                       {"detection": det}, {})


def test_stages_add_track_ids_tracks_and_counts():
    ctx = lambda name: StageContext(name, "t", None, StageStats(), {}, print, ["x"])  # noqa: E731
    track = create_stage("track.items", names=ITEM_NAMES, clock="frames", fps=15)
    count = create_stage("count.items")
    console = create_stage("sink.console", interval_s=1e9)
    track.open(ctx("track"))
    count.open(ctx("count"))
    console.open(ctx("console"))
    rng = np.random.default_rng(1)
    total, last = 0, None
    for tf in line(tuple(sorted(CLEAN.items())))[:200]:
        fr = count.process(track.process(_frame(tf.frame.index, detections_from_truth(tf, rng))))
        console.process(fr)
        det = fr.results["detection"]
        assert len(det["track_ids"]) == len(det["boxes"])
        ids = [int(t) for t in det["track_ids"] if t >= 0]
        assert len(ids) == len(set(ids))  # one detection per item per frame
        assert {a["id"] for a in fr.results["tracks"]["active"]} >= set(ids)
        total += len(fr.results["counts"]["counted"])
        last = fr
    assert last.results["counts"]["total"] == total > 20
    assert sum(last.results["counts"]["by_class"].values()) == total
    # `bash run.sh` shows the counts: in the console line and in the summary
    top = max(last.results["counts"]["by_class"].items(), key=lambda kv: kv[1])
    assert f"items {total} ({top[0]} {top[1]}" in console.line()
    from pipeline.commands._common import format_summary
    summary = format_summary({"graph": "g", "wall_s": 1.0, "errors": [], "stages": {"count": {
        "key": "count.items", "processed": 200, "dropped": 0, "errors": 0, "mean_ms": 0.1, **count.ctx.stats.extra}}})
    assert f"counted {total} ({top[0]} {top[1]}" in summary
    assert last.results["tracks"]["t"] == pytest.approx(199 / 15)
    assert last.results["tracks"]["velocity"][0] == pytest.approx(128 / 15, abs=1.0)


def test_bad_parameters_name_the_value_and_the_fix():
    for key, params, words in [("track.items", {"low_thresh": 0.5, "high_thresh": 0.3}, ["low_thresh", "0.5"]),
                               ("track.items", {"clock": "wall"}, ["clock", "'wall'", "frames"]),
                               ("track.items", {"track_buffer": 0}, ["track_buffer", ">= 1"]),
                               ("track.items", {"belt_motion": "fast"}, ["belt_motion", "'fast'", "[vx, vy]"]),
                               ("count.items", {"direction": "up"}, ["direction", "'up'", "ltr"]),
                               ("count.items", {"line_x": 2}, ["line_x", "(0, 1)"]),
                               ("count.items", {"min_hits": 0}, ["min_hits", ">= 1"])]:
        with pytest.raises(UsageError) as e:
            create_stage(key, **params)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_a_stream_that_starts_again_at_frame_zero_ends_its_items_and_keeps_ids_unique():
    logs: list[str] = []
    track = create_stage("track.items", clock="frames")
    track.open(StageContext("track", "t", None, StageStats(), {}, logs.append, ["x"]))
    rng = np.random.default_rng(2)
    frames = line(tuple(sorted(CLEAN.items())))[:30]
    first = [track.process(_frame(tf.frame.index, detections_from_truth(tf, rng))) for tf in frames]
    again = [track.process(_frame(tf.frame.index, detections_from_truth(tf, rng))) for tf in frames[:5]]
    alive_before = {a["id"] for a in first[-1].results["tracks"]["active"]}
    ended = again[0].results["tracks"]["ended"]
    assert alive_before <= {e["id"] for e in ended} and all(e["reason"] == "restart" for e in ended)
    old_ids = {a["id"] for fr in first for a in fr.results["tracks"]["active"]}
    new_ids = {a["id"] for fr in again for a in fr.results["tracks"]["active"]}
    assert new_ids and not (old_ids & new_ids)
    assert any("went back from frame 29 to 0" in m for m in logs)

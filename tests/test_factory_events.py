"""`events.items`: rule validation with clear errors, item lifecycle, line idle/running, low confidence and class
alerts, unique event ids; the factory graphs load."""
from __future__ import annotations

import pytest

from core.errors import UsageError
from pipeline.graph import GraphRunner, load_graph
from pipeline.stage import create_stage
from stages.factory.events import LineEvents, parse_rules


@pytest.mark.parametrize("rules, words", [
    ({"when": "idle"}, ["must be a list"]),
    (["idle"], ["rules[0]", "mapping"]),
    ([{"when": "stall"}], ["rules[0].when", "'stall'", "item, idle, low_confidence, class"]),
    ([{"when": "idle", "after": 3}], ["rules[0]", "['after']", "after_s"]),
    ([{"when": "idle"}], ["rules[0]", "needs after_s"]),
    ([{"when": "idle", "after_s": -1}], ["rules[0].after_s", "-1", "> 0"]),
    ([{"when": "item", "emit": ["new", "born"]}], ["rules[0].emit", "born", "'update'"]),
    ([{"when": "item", "min_hits": 0}], ["rules[0].min_hits", ">= 1"]),
    ([{"when": "low_confidence"}], ["needs min_score"]),
    ([{"when": "low_confidence", "min_score": 1.5}], ["rules[0].min_score", "1.5", "[0, 1]"]),
    ([{"when": "class", "classes": []}], ["rules[0].classes", "non-empty list"]),
    ([{"when": "idle", "after_s": 1}, {"when": "idle", "after_s": 2}], ["rules[1]", "second `idle`"]),
])
def test_bad_rules_name_the_rule_the_value_and_the_fix(rules, words):
    with pytest.raises(UsageError) as e:
        parse_rules(rules)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_rule_in_a_graph_yaml_stops_the_graph_with_one_line(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nstages:\n"
                 "  - {name: src, key: source.conveyor}\n"
                 "  - {name: enc, key: edge.encode, inputs: [src], params: {checkpoint: 'random:64'}}\n"
                 "  - {name: rec, key: server.record, inputs: [enc]}\n"
                 "  - {name: ev, key: events.items, inputs: [rec], params: {rules: [{when: idle, after_s: soon}]}}\n")
    with pytest.raises(UsageError) as e:
        GraphRunner(load_graph(p))
    assert "rules[0].after_s 'soon'" in str(e.value)


def _item(i, hits, cls=0, score=0.9, share=1.0, frame=0, reason=None):
    d = {"id": i, "class": cls, "name": f"c{cls}", "score": score, "class_share": share, "first_frame": 0,
         "last_frame": frame, "hits": hits, "box": [0, 0, 10, 10]}
    if reason:
        d["reason"] = reason
    return d


def _tracks(active=(), ended=()):
    return {"active": list(active), "ended": list(ended)}


def test_item_lifecycle_line_idle_and_running_with_unique_ids():
    rules = parse_rules([{"when": "item", "min_hits": 3, "update_every": 4}, {"when": "idle", "after_s": 1.0},
                         {"when": "low_confidence", "min_score": 0.5}, {"when": "class", "classes": ["c2"]}])
    le = LineEvents(rules, "L1", 0, "run1")
    fps = 10.0
    seq = []

    def step(frame, tracks, counts=None):
        ev = le.update(frame, frame / fps, tracks, counts)
        seq.extend(ev)
        return [e["type"] for e in ev]

    assert step(0, _tracks([_item(1, 1, score=0.3)])) == []  # not confirmed yet: no event
    assert step(1, _tracks([_item(1, 2, score=0.3)])) == []
    assert step(2, _tracks([_item(1, 3, score=0.3, frame=2)])) == ["item.new"]
    counted = {"counted": [{"id": 1, "crossing_frame": 3, "crossing_t": 0.3}]}
    assert step(3, _tracks([_item(1, 4, score=0.3, frame=3)]), counted) == ["item.update", "item.low_confidence"]
    assert seq[-2]["reason"] == "counted" and seq[-2]["item"]["crossing_frame"] == 3
    assert "score 0.30 < 0.5" in seq[-1]["why"]
    assert step(4, _tracks([_item(1, 5, cls=2, score=0.3)])) == ["item.update"]  # voted class changed
    assert seq[-1]["reason"] == "class" and seq[-1]["item"]["name"] == "c2"
    assert step(8, _tracks([_item(1, 6, cls=2, score=0.3)])) == ["item.update"] and seq[-1]["reason"] == "periodic"
    assert step(9, _tracks([], [_item(1, 6, cls=2, score=0.3, frame=8, reason="exit")])) == ["item.end"]
    end = seq[-1]
    assert end["reason"] == "exit" and end["item"]["counted"] and end["item"]["crossing_t"] == 0.3
    assert end["item"]["first_frame"] == 0 and end["item"]["last_frame"] == 8
    assert step(15, _tracks()) == []  # 0.7 s after the last item
    assert step(18, _tracks()) == ["line.idle"] and seq[-1]["idle_s"] == pytest.approx(1.0)
    assert step(25, _tracks()) == []  # said once
    assert step(26, _tracks([_item(2, 3, cls=2)]), {"counted": [{"id": 2, "crossing_frame": 26, "crossing_t": 2.6}]}) \
        == ["item.new", "item.update", "item.alert", "line.running"]
    ids = [e["id"] for e in seq]
    assert len(ids) == len(set(ids)) and all(i.startswith("L1:run1:0:") for i in ids)
    assert all(e["line"] == "L1" and e["stream"] == 0 for e in seq)


def test_unconfirmed_flicker_makes_no_lifecycle_events():
    le = LineEvents(parse_rules(None), "L1", 0, "r")
    assert le.update(0, 0.0, _tracks([_item(5, 1)]), None) == []
    assert le.update(1, 0.1, _tracks([], [_item(5, 1, reason="lost")]), None) == []


def test_events_stage_line_name_is_checked():
    with pytest.raises(UsageError) as e:
        create_stage("events.items", line="a/b")
    assert "'a/b'" in str(e.value) and "MQTT topics" in str(e.value)


def test_factory_graphs_load_and_build():
    for name, variables in (("factory", {"insecure": True}),
                            ("factory_demo", {"insecure": True, "source": "conveyor:1"})):
        spec = load_graph(name, variables)
        keys = [s.key for s in spec.stages]
        assert keys.index("results.merge") < keys.index("track.items") < keys.index("count.items") \
            < keys.index("events.items") < keys.index("sink.mqtt")
        runner = GraphRunner(spec)  # every stage's parameters are valid
        assert {"track", "count", "events", "mqtt", "metrics", "jsonl"} <= set(runner.nodes)

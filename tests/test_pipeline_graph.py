"""Stage registry, YAML graph validation, entry-point plugins and CLI errors (in-process, no model needed)."""
import importlib
import sys
import textwrap

import pytest

from pipeline import stage as stage_mod
from pipeline.cli import main
from core.errors import UsageError
from pipeline.graph import load_graph, parse_graph

PLUGIN = textwrap.dedent('''
    from stages.consumers import Consumer

    class FlakyConsumer(Consumer):
        """Test plugin: a consumer that raises on frame 1 and reports the frame index otherwise."""
        task = "flaky"

        def compute(self, f):
            if f.index == 1:
                raise RuntimeError("flaky consumer fails on frame 1")
            return {"index": f.index}
''')


def make_plugin(root):
    """A tiny installed distribution: package + dist-info whose entry_points.txt declares group ladon.stages."""
    (root / "ladon_test_plugin").mkdir(parents=True, exist_ok=True)
    (root / "ladon_test_plugin" / "__init__.py").write_text(PLUGIN)
    di = root / "ladon_test_plugin-0.1.dist-info"
    di.mkdir(exist_ok=True)
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: ladon-test-plugin\nVersion: 0.1\n")
    (di / "entry_points.txt").write_text("[ladon.stages]\ntest.flaky = ladon_test_plugin:FlakyConsumer\n")
    return root


def test_unknown_stage_key_names_key_and_allowed():
    with pytest.raises(UsageError) as e:
        stage_mod.create_stage("sink.nope")
    assert "sink.nope" in str(e.value) and "sink.jsonl" in str(e.value)


def test_yaml_errors_name_file_key_and_allowed(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nstages:\n  - {name: a, key: source.nope}\n")
    with pytest.raises(UsageError) as e:
        load_graph(p)
    msg = str(e.value)
    assert str(p) in msg and "stages[0].key" in msg and "source.nope" in msg and "source.video" in msg
    bad = [({"name": "g", "stages": [], "x": 1}, "unknown top-level key"),
           ({"name": "g", "stages": []}, "non-empty list"),
           ({"name": "g", "stages": [{"name": "a", "key": "sink.jsonl"}]}, "needs `inputs`"),
           ({"name": "g", "stages": [{"name": "a", "key": "source.video"},
                                     {"name": "b", "key": "source.video", "inputs": ["a"]}]}, "is a source"),
           ({"name": "g", "stages": [{"name": "a", "key": "sink.jsonl", "inputs": ["zz"]}]}, "no stage named 'zz'"),
           ({"name": "g", "stages": [{"name": "a", "key": "sink.jsonl", "inputs": ["b"]},
                                     {"name": "b", "key": "sink.console", "inputs": ["a"]}]}, "cycle"),
           ({"name": "g", "stages": [{"name": "a", "key": "source.video", "params": {"path": "${nope}"}}]},
            "unknown variable"),
           ({"name": "g", "stages": [{"name": "a", "key": "source.video", "colour": 1}]}, "unknown key")]
    for data, text in bad:
        with pytest.raises(UsageError, match=text.replace("(", r"\(").replace("`", ".")):
            parse_graph(data, "f.yaml")


def test_shipped_graphs_load():
    for name in ("demo", "edge", "server"):
        spec = load_graph(name, {"source": "x.mp4"})
        assert spec.stages


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    make_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(stage_mod, "_ENTRY_POINTS_LOADED", False)
    try:
        assert "test.flaky" in stage_mod.available_stages()
        s = stage_mod.create_stage("test.flaky")
        assert type(s).__module__ == "ladon_test_plugin" and s.key == "test.flaky"
    finally:
        stage_mod._REGISTRY.pop("test.flaky", None)
        sys.modules.pop("ladon_test_plugin", None)


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nstages:\n  - {name: a, key: camera.magic}\n")
    assert main(["run", "--config", str(p)]) == 2
    assert "camera.magic" in capsys.readouterr().err
    assert main(["run", "--config", "demo", "--source", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert main(["edge", "--source", "x.mp4", "--connect", "tcp://nohost"]) == 2
    assert "tcp://nohost" in capsys.readouterr().err
    assert main(["server", "--tasks", "detection,colour", "--bind", "tcp://127.0.0.1:5"]) == 2
    assert "colour" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    assert main(["run", "--config", "demo", "--source", str(bad), "--checkpoint", "random:64", "--quiet"]) != 0


def test_letterbox_mapping_back_to_original_frame():
    import numpy as np

    from core.geometry import letterbox_image, letterbox_params, map_boxes, map_class_map
    lb = letterbox_params(80, 48, 64)
    assert (lb.ratio, lb.left, lb.top, lb.unpad_w, lb.unpad_h) == (0.8, 0, 13, 64, 38)
    img = np.full((48, 80, 3), 7, np.uint8)
    boxed = letterbox_image(img, 64)  # Ultralytics' LetterBox: content rows 13..50, pad value 114
    assert boxed.shape == (64, 64, 3) and (boxed[:13] == 114).all() and (boxed[13:51] == 7).all()
    assert (boxed[51:] == 114).all()
    np.testing.assert_allclose(map_boxes(np.array([[0, 13, 64, 51], [8, 17, 16, 21]]), lb),
                               [[0, 0, 80, 47.5], [10, 5, 20, 10]])
    cmap = np.zeros((64, 64), np.uint8)
    cmap[13:51, 32:] = 3  # right half of the content
    back = map_class_map(cmap, lb)
    assert back.shape == (48, 80) and (back[:, 40:] == 3).all() and (back[:, :40] == 0).all()


def test_rle_round_trip():
    import numpy as np

    from core.rle import rle_decode, rle_encode
    m = np.random.default_rng(0).integers(0, 3, (7, 9)).astype(np.uint8)
    assert (rle_decode(rle_encode(m)) == m).all()


def test_server_task_subset():
    from pipeline.commands._common import select_tasks
    spec = load_graph("server")
    select_tasks(spec, ["detection", "classification"])
    assert [s.key for s in spec.stages if s.key.startswith("task.")] == ["task.detection", "task.classification"]
    assert spec.stage("merge").inputs == ["detection", "classification"]
    with pytest.raises(UsageError, match="colour"):
        select_tasks(spec, ["colour"])


MISWIRED = [
    # (upstream key, downstream key, what the message must name besides the two stages)
    ("source.conveyor", "sink.jsonl", ("emits Frame", "accepts only FrameResult, ResultRecord")),
    ("source.conveyor", "server.decode", ("emits Frame", "accepts only Packet", "edge.encode")),
]


@pytest.mark.parametrize("up,down,expected", MISWIRED)
def test_miswired_graph_is_refused_naming_both_stages_and_types(up, down, expected):
    data = {"name": "g", "stages": [{"name": "src", "key": up}, {"name": "out", "key": down, "inputs": ["src"]}]}
    with pytest.raises(UsageError) as e:
        parse_graph(data, "g.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("g.yaml: stages[1].inputs: ")
    assert f"'src' ({up})" in msg and f"'out' ({down})" in msg
    for text in expected:
        assert text in msg


def test_miswired_graph_exits_2_from_the_cli(tmp_path, capsys):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nstages:\n  - {name: source, key: source.conveyor}\n"
                 "  - {name: jsonl, key: sink.jsonl, inputs: [source]}\n")
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "'source' (source.conveyor) emits Frame" in err and "'jsonl' (sink.jsonl) accepts only FrameResult" in err


def test_contracts_are_checked_again_when_a_parsed_graph_is_edited():
    """Commands edit a parsed spec (--tasks, --pub): the runner checks the wiring it is given."""
    from pipeline.graph import GraphRunner, StageSpec
    spec = load_graph("server")
    spec.stages.append(StageSpec("raw", "sink.jsonl", ["decode"], {"path": "unused.jsonl"}))
    with pytest.raises(UsageError, match=r"'decode' \(server.decode\) emits Features"):
        GraphRunner(spec)


def test_shipped_graphs_pass_the_contract_check():
    from pipeline.graph import CONFIG_DIR
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        assert load_graph(path).stages, path


def test_builtin_stage_modules_are_declared_as_entry_points():
    """pyproject.toml declares the built-in modules in the ladon.stages group; the fallback list is the same."""
    import tomllib
    from importlib.metadata import entry_points
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["ladon.stages"]
    assert declared == {m: m for m in stage_mod.BUILTIN_STAGE_MODULES}, (
        "a built-in stage module goes into both pyproject.toml [project.entry-points.\"ladon.stages\"] "
        "(\"module\" = \"module\") and pipeline.stage.BUILTIN_STAGE_MODULES")
    installed = {ep.name: ep.value for ep in entry_points(group=stage_mod.ENTRY_POINT_GROUP) if stage_mod._is_own(ep)}
    if not installed:
        pytest.skip("the project is not installed (pip install -e .): built-ins come from the fallback list")
    assert installed == declared, "installed metadata is stale: run pip install --no-deps --no-build-isolation -e ."


def test_builtins_load_without_installed_entry_points():
    """A checkout used without `pip install -e .` still finds every built-in stage (the fallback list)."""
    import subprocess
    code = ("import importlib.metadata as md; md.entry_points = lambda **kw: []\n"
            "import pipeline.stage as s; keys = s.available_stages()\n"
            "need = {'source.video', 'edge.encode', 'server.decode', 'task.detection', 'task.classification',"
            " 'results.merge', 'sink.jsonl', 'server.ray', 'track.items', 'sink.mqtt'}\n"
            "print(sorted(need - set(keys)))")
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_entry_point_module_plugin_registers_its_stages_and_a_broken_one_is_named(tmp_path, monkeypatch):
    (tmp_path / "ladon_test_modules.py").write_text(textwrap.dedent('''
        from pipeline.stage import Stage, register_stage

        @register_stage
        class Echo(Stage):
            """Test plugin module: passes messages through."""
            key = "test.echo"

            def process(self, msg):
                return msg
    '''))
    di = tmp_path / "ladon_test_modules-0.1.dist-info"
    di.mkdir()
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: ladon-test-modules\nVersion: 0.1\n")
    (di / "entry_points.txt").write_text("[ladon.stages]\ntest.modules = ladon_test_modules\n"
                                         "test.broken = ladon_test_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(stage_mod, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(stage_mod, "_EP_ERRORS", {})
    try:
        assert "test.echo" in stage_mod.available_stages()
        assert stage_mod.get_stage_class("test.echo").__module__ == "ladon_test_modules"
        with pytest.raises(UsageError, match="entry point 'test.broken' failed to load.*ladon_test_no_such_module"):
            stage_mod.get_stage_class("test.nothing")
    finally:
        stage_mod.unregister_stage("test.echo")
        sys.modules.pop("ladon_test_modules", None)


def test_list_stages_uses_the_public_registry(capsys):
    assert main(["run", "--list-stages"]) == 0
    out = capsys.readouterr().out
    assert "task.detection" in out and "stages.consumers.DetectionConsumer" in out and "source.conveyor" in out


def test_thread_budget_is_shared_by_the_model_stages(tmp_path):
    """Torch's thread count is per process: the graph's budget is split over the stages that run models."""
    import os

    import torch

    from pipeline.graph import GraphRunner, model_threads

    assert model_threads(8, 3) == 2 and model_threads(2, 5) == 1 and model_threads(4, 0) == 4
    assert model_threads(None, 1) == (os.cpu_count() or 1)
    with pytest.raises(UsageError, match="threads"):
        parse_graph({"name": "g", "threads": 0, "stages": [{"name": "s", "key": "source.conveyor"}]}, "g.yaml")
    doc = {"name": "g", "threads": 3, "stages": [
        {"name": "src", "key": "source.conveyor", "params": {"max_frames": 1}},
        {"name": "enc", "key": "edge.encode", "inputs": ["src"], "params": {"checkpoint": "random:64"}},
        {"name": "dec", "key": "server.decode", "inputs": ["enc"], "params": {"checkpoint": "random:64"}},
        {"name": "det", "key": "task.detection", "inputs": ["dec"]}]}
    before = torch.get_num_threads()
    runner = GraphRunner(parse_graph(doc, "g.yaml"))
    try:
        runner.open()
        assert runner.model_threads == 1 and torch.get_num_threads() == 1  # 3 cores over 3 model stages
    finally:
        runner.close_opened()
        torch.set_num_threads(before)


def test_a_command_whose_packages_are_missing_says_so_in_one_line():
    """A device install has the edge only: `bench` there names the missing module and the install, exit 2."""
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "from pipeline.cli import main\n"
            "sys.exit(main(['bench', '--quick']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "'torch'" in lines[0] and "pip install .[server]" in lines[0]


def test_threads_option_is_checked_before_anything_is_made(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--threads", "0", "--checkpoint", "random:64", "--out", str(out)]) == 2
    assert "--threads 0" in capsys.readouterr().err
    assert not out.exists()  # no demo clip, no keys


def test_the_demo_remakes_a_clip_made_for_another_input_size(tmp_path):
    """A clip left by a model of another input size (a 64 px clip for a 256 px model) is made again."""
    from pipeline.commands.run import _frame_size, make_demo_video

    video = tmp_path / "conveyor_demo_heldout.mp4"
    make_demo_video(video, frames=3, size=64)
    assert _frame_size(video) == (64, 64)
    assert main(["run", "--checkpoint", "random:96", "--out", str(tmp_path), "--max-frames", "2", "--quiet",
                 "--insecure"]) == 0
    assert _frame_size(video) == (96, 96)
    video.write_bytes(b"not a video")
    assert _frame_size(video) is None
